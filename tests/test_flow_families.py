"""The flow-matching families, read from the model: SD3 (an MM-DiT, three text encoders), FLUX.1 (packed latents,
CLIP pooled + T5, guidance embedding), both with a 16-channel VAE with a shift, and FLUX.2 [klein] (a chat-templated
Qwen3 read at three layers, a VAE normalised by batch-norm statistics of 2x2 patches); the same scripts, loop and guarantees
as SD 1.x and SDXL. The objective is checked against the formulas of diffusers' SD3/FLUX scripts, and the family's
conditioning and denoiser call against the pipelines' own; DreamBooth runs the bf16 launcher matrix, resumes exactly,
and its outputs load in plain diffusers."""

import json

import pytest
import torch

from .helpers import (
    DEEPSPEED_CONFIGS,
    LAUNCHERS,
    REPO,
    SHARP_ADAM,
    assert_agrees_within_bf16,
    check_model_card_usage,
    in_process_accelerator,
    run_matrix_case,
    run_script,
    weights,
)


def tiny(tiny_models, family: str):
    """The tiny model of a family (`FAMILIES` name)."""
    return getattr(tiny_models, family.replace("-", "_"))


def db_args(model, shard_dir) -> list:
    return ["--pretrained_model_name_or_path", model, "--shard_dir", shard_dir, "--instance_category", "cat",
            "--instance_prompt", "a sks sketch of a cat", "--resolution", "64", "--report_to", "none"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_training_conditions_and_denoises_as_the_pipeline_generates(family, tiny_models):
    """`Family.encode` gives the pipeline's `encode_prompt` embeddings, and one Euler step from pure noise with
    `Family.predict`'s velocity (x0 = noise - v at σ = 1) is the pipeline's own one-step result: what is trained is
    what generates."""
    import diffusers

    from sketch2real.family import FAMILIES
    from sketch2real.training.diffusion import tokenize

    f = FAMILIES[family]
    pipe = getattr(diffusers, f.pipeline).from_pretrained(getattr(tiny_models, family))
    prompt = "a sks sketch of a cat"
    ids = [tokenize(getattr(pipe, name), [prompt], f.max_length(getattr(pipe, name))) for name in f.tokenizers]
    assert all(torch.equal(a, b) for a, b in zip(ids, f.tokenize([getattr(pipe, name) for name in f.tokenizers], [prompt])))
    with torch.no_grad():
        text = f.encode([getattr(pipe, name) for name in f.text_encoders], ids, 64)
        if family == "sd3":
            states, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False,
                                                      **f.generation_kwargs())
        else:
            states, pooled, _ = pipe.encode_prompt(prompt, None, **f.generation_kwargs())
        assert torch.equal(text.states, states) and torch.equal(text.pooled, pooled)

        noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        velocity = f.predict(pipe.transformer, noise, torch.tensor([1000.0]), text, guidance=3.5)
        if family == "sd3":  # guidance_scale 1: no classifier-free guidance, one transformer call
            out = pipe(prompt, latents=noise, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                       height=64, width=64, **f.generation_kwargs()).images
        else:  # FLUX [dev]: the guidance is an input of the transformer
            packed = diffusers.FluxPipeline._pack_latents(noise, 1, 16, 8, 8)
            out = pipe(prompt, latents=packed, num_inference_steps=1, guidance_scale=3.5, output_type="latent",
                       height=64, width=64, **f.generation_kwargs()).images
            out = diffusers.FluxPipeline._unpack_latents(out, 8, 8, 1)
    torch.testing.assert_close(out, noise - velocity)


def test_flux2_klein_trains_as_its_pipeline_generates(tiny_models):
    """FLUX.2 [klein]: `Family.tokenize` + `encode` give `Flux2KleinPipeline.encode_prompt`'s embeddings (chat template,
    attention mask, layers 9/18/27); the training latents are the pipeline's (the VAE's batch-norm statistics per
    patch channel); one Euler step from pure noise with `Family.predict`'s velocity is the pipeline's own."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    from sketch2real.family import FAMILIES
    from sketch2real.training.diffusion import scaled_latents

    f, prompt = FAMILIES["flux2-klein"], "a sks sketch of a cat"
    pipe = Flux2KleinPipeline.from_pretrained(tiny_models.flux2_klein)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        text = f.encode([pipe.text_encoder], f.tokenize([pipe.tokenizer], [prompt]), 64)
        states, _ = pipe.encode_prompt(prompt, **f.generation_kwargs())
        assert torch.equal(text.states, states)

        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        raw = pipe.vae.encode(image).latent_dist.mode()
        torch.testing.assert_close(Flux2Pipeline._patchify_latents(scaled_latents(pipe.vae, raw)),
                                   pipe._encode_vae_image(image, generator=None))

        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        velocity = f.predict(pipe.transformer, noise, torch.tensor([1000.0]), text)
        out = pipe(prompt=prompt, latents=Flux2Pipeline._patchify_latents(noise), num_inference_steps=1, height=64,
                   width=64, output_type="latent", **f.generation_kwargs()).images  # step-distilled: no guidance
    torch.testing.assert_close(scaled_latents(pipe.vae, out), noise - velocity)

    # validation's pipeline, assembled from the trainer's components, is the same step-distilled model (no
    # classifier-free guidance at the family's guidance scale), not a base model's
    from sketch2real.models import assemble_pipeline, load_sd_components

    c = load_sd_components(str(tiny_models.flux2_klein))
    assembled = assemble_pipeline(c, c.denoiser, c.text_encoder, f.validation_scheduler(c.noise_scheduler))
    assembled.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=prompt, height=64, width=64, num_inference_steps=2, guidance_scale=f.guidance_scale,
                  output_type="np", **f.generation_kwargs())
    images = [p(generator=torch.Generator().manual_seed(0), **kwargs).images for p in (assembled, pipe)]
    assert assembled.config.is_distilled and (images[0] == images[1]).all()


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none", "sigma_sqrt", "cosmap"])
def test_flow_matching_follows_diffusers_sd3_formulas(tiny_models, scheme):
    """Timesteps on the scheduler's shifted training grid, σ the scheduler's own sigma for that timestep (as
    diffusers' scripts look it up), noisy = (1 - σ)x + σn, target n - x, the loss weighted as
    `compute_loss_weighting_for_sd3`; draws are a function of the generator alone."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from sketch2real.training.diffusion import FlowMatchingObjective

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_models.sd3, subfolder="scheduler")
    objective = FlowMatchingObjective(scheduler, scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.29)
    timesteps = objective.draw_timesteps(64, torch.Generator().manual_seed(1))
    assert torch.equal(timesteps, objective.draw_timesteps(64, torch.Generator().manual_seed(1)))
    u = compute_density_for_timestep_sampling(scheme, 64, 0.3, 0.8, 1.29, generator=torch.Generator().manual_seed(1))
    indices = (u * scheduler.config.num_train_timesteps).long()
    assert torch.equal(timesteps, scheduler.timesteps[indices])
    scheduler.set_timesteps(3)  # a validation pipeline sharing the scheduler must not move the training grid
    assert torch.equal(objective.draw_timesteps(64, torch.Generator().manual_seed(1)), timesteps)

    fresh = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_models.sd3, subfolder="scheduler")
    sigmas = torch.stack([fresh.sigmas[(fresh.timesteps == t).nonzero().item()] for t in timesteps])
    x, n = torch.randn(64, 16, 4, 4), torch.randn(64, 16, 4, 4)
    noisy, target = objective.noisy_and_target(x, n, timesteps)
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * x + s * n)
    assert torch.equal(target, n - x)
    prediction = torch.randn_like(x)
    expected = (compute_loss_weighting_for_sd3(scheme, s) * (prediction - target) ** 2).reshape(64, -1).mean(1)
    torch.testing.assert_close(objective.loss(prediction, target, timesteps), expected)


FLOW_MATRIX = [*SHARP_ADAM, "--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "2",
               "--num_validation_images", "1", "--validation_inference_steps", "2", "--num_heldout_samples", "2",
               "--learning_rate", "1e-2", "--weighting_scheme", "logit_normal"]
FLOW_CASES = [(family, launcher, "lora") for family in ("sd3", "flux", "flux2-klein") for launcher in LAUNCHERS] + [
    ("sd3", "1", "full"), ("sd3", "zero3", "full"), ("flux2-klein", "1", "full")]  # SD3.5 Medium's full fine-tuning


@pytest.mark.parametrize("family, launcher, variant", FLOW_CASES)
def test_flow_dreambooth_bf16(family, launcher, variant, tiny_models, shard_dir, tmp_path, tmp_path_factory):
    """DreamBooth on a tiny SD3, FLUX.1 and FLUX.2 [klein]: LoRA on every launcher (and SD3's full transformer), fp32
    trained weights, 2 processes agreeing with 1 as on SD 1.x, outputs that load in the plain diffusers pipeline
    (`load_lora_weights` sets every trained adapter to its saved value)."""
    import diffusers

    from sketch2real.family import FAMILIES

    model, pipeline = tiny(tiny_models, family), getattr(diffusers, FAMILIES[family].pipeline)
    extra = ["--lora_rank", "4"] if variant == "lora" else []
    out, one, one_fp32 = run_matrix_case(launcher, f"{family}-{variant}", "train/dreambooth.py",
                                         [*db_args(model, shard_dir), *FLOW_MATRIX, *extra], tmp_path, tmp_path_factory)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["heldout_loss"] == metrics["heldout_loss"]
    assert (out / "validation" / "step-000002.png").is_file()
    if variant == "lora":
        pipe = pipeline.from_pretrained(model)
        pipe.load_lora_weights(out)
        a, b, a32 = ({k: v for k, v in weights(run).items() if "lora_B" in k}
                     for run in (one, out, one_fp32))
        assert a and {v.dtype for v in b.values()} == {torch.float32} and a.keys() == b.keys()
        assert all(k.startswith("pytorch_lora_weights.safetensors:transformer.") for k in b)
        assert_agrees_within_bf16(a, b, a32, {k: torch.zeros_like(v) for k, v in a.items()})
        loaded = {f"pytorch_lora_weights.safetensors:transformer.{name.replace('.default_0', '')}": value
                  for name, value in pipe.transformer.named_parameters() if "lora_B" in name}
        assert loaded.keys() == b.keys() and all(torch.equal(loaded[k], b[k].to(loaded[k].dtype)) for k in b)
    else:
        pipe = pipeline.from_pretrained(out)
        base = weights(model / "transformer")
        trained = weights(out / "transformer")
        assert {v.dtype for v in trained.values()} == {torch.float32}
        assert_agrees_within_bf16(weights(one / "transformer"), trained, weights(one_fp32 / "transformer"), base)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a sks sketch of a cat", height=64, width=64, num_inference_steps=2,
                 **FAMILIES[family].generation_kwargs(), output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    if launcher == "1":  # the card's diffusers lines, as a reader pastes them
        prompt, card = check_model_card_usage(out, shard_dir, tmp_path)
        assert prompt == "a sks sketch of a cat" and card["image"].size[0] > 0


def test_a_flux2_klein_dora_continues_from_its_folder(tiny_models, shard_dir, tmp_path):
    """--initial_lora (each sequential stage after the first) sets FLUX.2 [klein]'s DoRA to the saved one, magnitudes
    of the single blocks' `attn.to_out` included (a UNet's renaming sent them to `to_out.0` and the run was refused)."""
    from safetensors.torch import load_file

    args = [*db_args(tiny_models.flux2_klein, shard_dir), "--lora_rank", "4", "--use_dora", "--max_train_steps", "1",
            "--validation_steps", "0", "--checkpointing_steps", "0", "--num_heldout_samples", "0"]
    run_script("train/dreambooth.py", *args, "--output_dir", tmp_path / "first")
    run_script("train/dreambooth.py", *args, "--learning_rate", "1e-30", "--initial_lora", tmp_path / "first",
               "--output_dir", tmp_path / "continued")  # a step that moves nothing: what was loaded is saved
    saved, continued = (load_file(tmp_path / run / "pytorch_lora_weights.safetensors") for run in ("first", "continued"))
    assert any("attn.to_out.lora_magnitude_vector" in k for k in saved)
    assert continued.keys() == saved.keys() and all(torch.allclose(continued[k], saved[k], rtol=1e-6, atol=1e-20)
                                                    for k in saved)


# diffusers' FLUX.1 LoRA script's default targets: the text stream's attention and both feed-forwards too
FLUX_SCRIPT_LAYERS = ("attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,"
                      "attn.to_add_out,ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2")


def test_lora_layers_adapts_the_modules_named_as_diffusers_flux_script_does(tiny_models, shard_dir, tmp_path):
    """--lora_layers (the SD3/FLUX scripts' flag) adapts exactly those modules, and plain diffusers reloads each of them
    to its trained value; a name that matches no module is one line, naming the family's default."""
    import diffusers

    model, out = tiny_models.flux, tmp_path / "layers"
    args = [*db_args(model, shard_dir), "--lora_rank", "4", "--learning_rate", "1e-2", "--max_train_steps", "2",
            "--validation_steps", "0", "--checkpointing_steps", "0", "--num_heldout_samples", "0"]
    run_script("train/dreambooth.py", *args, "--lora_layers", FLUX_SCRIPT_LAYERS, "--output_dir", out)
    saved = {k.split(":")[1].removeprefix("transformer.").replace(".lora_B.weight", ""): v
             for k, v in weights(out).items() if "lora_B" in k}
    pipe = diffusers.FluxPipeline.from_pretrained(model)
    adapted = {name for name, _ in pipe.transformer.named_modules()
               if any(name.endswith(f".{layer}") for layer in FLUX_SCRIPT_LAYERS.split(","))}
    assert set(saved) == adapted and any(".ff_context.net.2" in name for name in saved)
    pipe.load_lora_weights(out)
    loaded = {name.replace(".lora_B.default_0.weight", ""): value for name, value in pipe.transformer.named_parameters()
              if "lora_B" in name}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    proc = run_script("train/dreambooth.py", *args, "--lora_layers", "attn.to_k,attn.nope", "--output_dir",
                      tmp_path / "unknown", check=False)
    assert proc.returncode == 2 and "--lora_layers attn.to_k,attn.nope: attn.nope matches no module of this " \
        "FluxTransformer2DModel (its default: to_k,to_q,to_v,to_out.0)" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2-klein"])
def test_flow_resume_continues_exactly_and_two_processes_match_one(family, shard_dir, tmp_path, tiny_models):
    """Killed after a checkpoint and resumed: bit-identical adapters; and 2 DDP processes (fp32) give the 1-process
    adapters (the same global batches, noise and flow-matching timesteps); the LoRA folder generates as a model."""
    import shutil

    from .helpers import launch, relative_difference

    args = [*db_args(tiny(tiny_models, family), shard_dir), "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--lora_rank", "4", "--learning_rate", "1e-2", "--weighting_scheme", "logit_normal", "--validation_steps", "0"]
    straight, resumed, two = tmp_path / "straight", tmp_path / "resumed", tmp_path / "two"
    run_script("train/dreambooth.py", *args, "--output_dir", straight, "--train_batch_size", "2")
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    proc = run_script("train/dreambooth.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest",
                      "--train_batch_size", "2")
    assert "resumed from" in proc.stderr
    a, b = weights(straight), weights(resumed)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    launch("train/dreambooth.py", *args, "--output_dir", two, "--train_batch_size", "1")
    zeros = {k: torch.zeros_like(v) for k, v in a.items()}
    assert relative_difference(a, weights(two), zeros) < 1e-4
    # the LoRA run's folder is a model for generation (its base from run_config.json)
    run_script("infer/generate.py", "--pretrained_model_name_or_path", straight, "--prompts", "a sks sketch of a cat",
               "--output_dir", tmp_path / "images", "--height", "64", "--width", "64", "--num_inference_steps", "2",
               "--num_images_per_prompt", "2")
    assert len(list((tmp_path / "images" / "images").rglob("*.png"))) == 2
    from sketch2real.family import FAMILIES  # without --guidance_scale: the family's own (FLUX.1 [dev]'s 3.5)

    rows = [json.loads(line) for line in (tmp_path / "images" / "index.jsonl").read_text().splitlines()]
    assert {r["settings"]["guidance_scale"] for r in rows} == {FAMILIES[family].guidance_scale}


def test_a_trainer_not_built_for_a_family_says_so_before_loading_weights(tiny_models, shard_dir, tmp_path, monkeypatch):
    """Before any weight is loaded: a folder holding only SD3's model_index.json, with ControlNet taken off SD3's
    trainers, gets the one line (not a loading error)."""
    import dataclasses
    import shutil

    from sketch2real.cli import UserError
    from sketch2real.family import FAMILIES
    from sketch2real.training.controlnet import ControlNetOptions, ControlNetTask

    model = tmp_path / "index-only"
    model.mkdir()
    shutil.copy(tiny_models.sd3 / "model_index.json", model)
    monkeypatch.setitem(FAMILIES, "sd3", dataclasses.replace(FAMILIES["sd3"], trainers=("dreambooth",)))
    opts = ControlNetOptions(pretrained_model_name_or_path=str(model), shard_dir=str(shard_dir), output_dir=str(tmp_path),
                             resolution=64)
    accelerator = in_process_accelerator("no")
    with pytest.raises(UserError, match="controlnet is not built for sd3 models yet"):
        ControlNetTask(opts, accelerator)


def _perturbed(model, seed: int):
    """`model` with every weight moved by seeded noise: a new ControlNet's zero-initialised outputs would make any
    way of calling it look right."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_controlnet_is_trained_as_its_pipeline_generates(family, tiny_models, monkeypatch):
    """`Family.control_input` + `Family.predict` with a ControlNet give the ControlNet pipeline's own one-step result
    (the sketch's VAE latents, shifted and scaled; SD3's pooled input; FLUX's packed control latents and guidance),
    and the sketch changes the prediction."""
    import diffusers
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from sketch2real.family import FAMILIES
    from sketch2real.training.controlnet import init_controlnet
    from sketch2real.training.diffusion import tokenize

    f, model = FAMILIES[family], getattr(tiny_models, family)
    base = getattr(diffusers, f.pipeline).from_pretrained(model)
    controlnet = _perturbed(init_controlnet(base.transformer, seed=0, family=f), seed=1)
    assert type(controlnet).__name__ == f.controlnet_class
    pipe = getattr(diffusers, f.controlnet_pipeline).from_pretrained(model, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())  # as trained
    sketch, other = Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), "white")
    sketch.paste((0, 0, 0), (10, 10, 50, 50))
    prompt, noise = "a photo of a cat", torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = [tokenize(getattr(pipe, name), [prompt], f.max_length(getattr(pipe, name))) for name in f.tokenizers]
        text = f.encode([getattr(pipe, name) for name in f.text_encoders], ids, 64)
        velocities = [f.predict(pipe.transformer, noise, torch.tensor([1000.0]), text, controlnet,
                                f.control_input(pipe.vae, to_tensor(image)[None], controlnet), guidance=3.5)
                      for image in (sketch, other)]
        latents = noise if family == "sd3" else diffusers.FluxPipeline._pack_latents(noise, 1, 16, 8, 8)
        out = pipe(prompt, control_image=sketch, latents=latents, num_inference_steps=1, output_type="latent",
                   guidance_scale=1.0 if family == "sd3" else 3.5, height=64, width=64, **f.generation_kwargs()).images
    if family == "flux":
        out = diffusers.FluxPipeline._unpack_latents(out, 8, 8, 1)
    torch.testing.assert_close(out, noise - velocities[0])
    assert (velocities[0] - velocities[1]).abs().max() > 1e-3


@pytest.mark.parametrize("family, launcher", [("sd3", "ddp"), ("flux", "zero2")])
def test_flow_controlnet_bf16_two_processes_agree_and_it_generates_from_sketches(family, launcher, tiny_models,
                                                                               shard_dir, tmp_path, tmp_path_factory):
    """The same ControlNet script on SD3 and FLUX.1: fp32 trained weights, 2 processes agree with 1 (SD3's under DDP,
    which failed at the second step on the parameters its ControlNet leaves unused), the folder loads in the family's
    ControlNet pipeline with the settings it was trained with (SD3's pooled prompt: the saved config said zeros), and
    infer/generate.py conditions each image on its sketch."""
    import diffusers

    from sketch2real.family import FAMILIES
    from sketch2real.models import load_sd_components
    from sketch2real.training.controlnet import init_controlnet

    f, model = FAMILIES[family], getattr(tiny_models, family)
    args = ["--pretrained_model_name_or_path", model, "--shard_dir", shard_dir, "--resolution", "64", "--categories",
            "cat", "--learning_rate", "1e-2", "--max_train_steps", "2", *SHARP_ADAM, "--validation_steps", "2",
            "--num_validation_images", "1", "--validation_inference_steps", "2", "--num_heldout_samples", "2",
            "--num_validation_sketches", "1", "--checkpointing_steps", "0", "--report_to", "none"]
    out, one, one_fp32 = run_matrix_case(launcher, f"cn-{family}", "train/controlnet.py", args, tmp_path, tmp_path_factory)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_loss"] == metrics["heldout_loss"] and (out / "validation" / "step-000002.png").is_file()
    controlnet = getattr(diffusers, f.controlnet_class).from_pretrained(out)
    assert controlnet.dtype == torch.float32
    start = init_controlnet(load_sd_components(str(model)).denoiser, seed=0, family=f)
    assert {k: v for k, v in controlnet.config.items() if not k.startswith("_")} == \
        {k: v for k, v in start.config.items() if not k.startswith("_")}
    base = {f"diffusion_pytorch_model.safetensors:{k}": v for k, v in start.state_dict().items()}
    assert_agrees_within_bf16(weights(one), weights(out), weights(one_fp32), base)
    pipe = getattr(diffusers, f.controlnet_pipeline).from_pretrained(model, controlnet=controlnet)
    assert type(pipe).__name__ == f.controlnet_pipeline
    gen = tmp_path / "gen"
    run_script("infer/generate.py", "--pretrained_model_name_or_path", model, "--controlnet", out, "--shard_dir",
               shard_dir, "--split", "test", "--categories", "cat", "--height", "64", "--width", "64",
               "--num_inference_steps", "2", "--prompt_template", "a photo of a {category}", "--output_dir", gen)
    rows = [json.loads(line) for line in (gen / "index.jsonl").read_text().splitlines()]
    assert rows and all((gen / r["image"]).is_file() and r["controlnet"] == str(out) for r in rows)


@pytest.mark.parametrize("family, launcher, t5", [("sd3", "zero3", False), ("flux", "ddp", True)])
def test_flow_textual_inversion_trains_clip_rows_in_fp32_and_loads(family, launcher, t5, tiny_models, shard_dir, tmp_path,
                                                                  tmp_path_factory):
    """Pivotal embeddings: the token gets fp32 rows in each CLIP encoder (SD3: clip_l and clip_g; FLUX.1: clip_l) and,
    with --enable_t5_ti, in T5 (whose 28 rows no token reaches are dropped first, as diffusers' loader drops them);
    2 processes agree with 1; the saved pipeline is the base plus those rows, bit for bit, and the file loads into a
    plain pipeline through `load_textual_inversion` and changes its images."""
    import diffusers
    from safetensors.torch import load_file

    from sketch2real.family import FAMILIES, load_textual_inversion
    from sketch2real.training.textual_inversion import initializer_ids

    f, model = FAMILIES[family], getattr(tiny_models, family)
    keys, learning = f.learned_embedding_keys(t5), f.embedding_encoders(t5)
    args = [*(["--enable_t5_ti"] if t5 else []), "--pretrained_model_name_or_path", model, "--shard_dir", shard_dir, "--resolution", "64", "--categories",
            "cat", "--learning_rate", "5e-2", "--max_train_steps", "2", *SHARP_ADAM, "--validation_steps", "2",
            "--num_validation_images", "1", "--validation_inference_steps", "2", "--num_heldout_samples", "2",
            "--checkpointing_steps", "0", "--report_to", "none", "--save_as_full_pipeline"]
    out, one, one_fp32 = run_matrix_case(launcher, f"ti-{family}", "train/textual_inversion.py", args, tmp_path,
                                         tmp_path_factory)
    embeds = load_file(out / "learned_embeds.safetensors")
    pipeline = getattr(diffusers, f.pipeline)
    base = pipeline.from_pretrained(model)
    encoders = [getattr(base, name) for name in f.text_encoders[:learning]]
    assert sorted(embeds) == sorted(keys)
    assert [tuple(embeds[k].shape) for k in keys] == [(1, e.get_input_embeddings().embedding_dim) for e in encoders]
    assert {v.dtype for v in embeds.values()} == {torch.float32}
    starts = {}
    for key, name, encoder in zip(keys, f.tokenizers, encoders):
        sketch_id = initializer_ids(getattr(base, name), "sketch")[0]
        starts[key] = encoder.get_input_embeddings().weight[sketch_id][None].detach()
    rows = [{k: load_file(run / "learned_embeds.safetensors")[k] for k in keys} for run in (one, out, one_fp32)]
    assert_agrees_within_bf16(*rows, starts)

    full = pipeline.from_pretrained(out)
    for name in f.text_encoders:  # the learning encoders: their reachable rows and the trained one; the rest: the base's
        a, b = getattr(base, name).state_dict(), getattr(full, name).state_dict()
        for key, tensor in a.items():
            if b[key].shape != tensor.shape:
                reachable = len(getattr(base, f.tokenizers[f.text_encoders.index(name)]))
                assert name in f.text_encoders[:learning] and torch.equal(b[key][:-1], tensor[:reachable])
                assert torch.equal(b[key][-1], embeds[keys[f.text_encoders.index(name)]][0])
            else:
                assert torch.equal(b[key], tensor), (name, key)
    for i, name in enumerate(f.tokenizers):  # the token in the learning encoders' tokenizers only
        assert len(getattr(full, name)) == len(getattr(base, name)) + (i < learning), name

    trained = pipeline.from_pretrained(model)
    load_textual_inversion(trained, str(out / "learned_embeds.safetensors"))
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="np", **f.generation_kwargs())
    images = [pipe("a cat in the style of <sketch>", generator=torch.Generator().manual_seed(0), **kwargs).images
              for pipe in (full, trained)]
    assert (images[0] == images[1]).all()
    plain = base("a cat in the style of sketch", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(images[0] - plain).max() > 1e-6


def test_frozen_text_encoders_are_released_after_encoding_and_come_back_for_validation(tiny_models, shard_dir, tmp_path):
    """DreamBooth with frozen encoders encodes its prompts once and frees the encoders (T5-XXL: 9.5 GB in bf16): no
    reference to them survives; the cached conditionings are the encoders' own, a new prompt is encoded by encoders
    loaded for that moment, and validation images (encoders loaded again) equal a pipeline that never released them."""
    import gc
    import weakref

    from sketch2real.family import FAMILIES
    from sketch2real.models import assemble_pipeline, load_sd_components
    from sketch2real.training.dreambooth import DreamBoothOptions, DreamBoothTask
    from sketch2real.training.validation import generate_rows

    model = str(tiny_models.flux)
    opts = DreamBoothOptions(pretrained_model_name_or_path=model, shard_dir=str(shard_dir), output_dir=str(tmp_path),
                             instance_category="cat", instance_prompt="a sks sketch of a cat", resolution=64,
                             mixed_precision="bf16", lora_rank=4, num_heldout_samples=2, num_validation_images=1,
                             validation_inference_steps=2)
    accelerator = in_process_accelerator("bf16")
    components = load_sd_components(model)
    t5 = weakref.ref(components.text_encoder_2)
    task = DreamBoothTask(opts, accelerator, components)
    gc.collect()
    assert t5() is None and all(e is None for e in task.c.text_encoders)

    fresh = load_sd_components(model)
    encoders = [e.to(torch.bfloat16) for e in fresh.text_encoders]
    f = FAMILIES["flux"]
    from sketch2real.training.diffusion import tokenize

    def encode(prompt):
        ids = [tokenize(t, [prompt], f.max_length(t)) for t in fresh.tokenizers]
        with torch.no_grad():
            return f.encode(encoders, ids, 64)

    for prompt in ("a sks sketch of a cat", "a photo of a dog"):  # cached, then loaded for the moment
        got, expected = task.condition([prompt]), encode(prompt)
        assert torch.equal(got.states, expected.states) and torch.equal(got.pooled, expected.pooled), prompt
    assert all(e is None for e in task.c.text_encoders)

    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731  (as `validate` runs it)
    with task.resident_text_encoders(), autocast():
        rows, _, _ = task.validation_images(task.model)
    scheduler = f.validation_scheduler(fresh.noise_scheduler)
    for name, encoder in zip(f.text_encoders, encoders):
        setattr(fresh, name, encoder)
    with autocast():
        kept = generate_rows(assemble_pipeline(fresh, task.c.denoiser, fresh.text_encoder, scheduler),
                             ["a sks sketch of a cat"], 1, opts.seed, 64, 2)
    import numpy as np

    assert np.array_equal(np.asarray(rows[0][0]), np.asarray(kept[0][0]))


class _Loaded(Exception):
    """Stops a trainer right after its components are loaded."""


def bf16_checkpoint(model, out):
    """A copy of a pipeline folder whose text encoders and denoiser are stored in bf16, as FLUX.1's are."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    for part in ("text_encoder", "text_encoder_2", "transformer"):
        for file in (out / part).glob("*.safetensors"):
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
        if part.startswith("text_encoder"):  # transformers' configs say their stored dtype
            config = json.loads((out / part / "config.json").read_text())
            config.update({"dtype": "bfloat16", "torch_dtype": "bfloat16"})
            (out / part / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("trainer, extra, full_precision", [
    ("dreambooth", {"lora_rank": 4}, set()),
    ("dreambooth", {}, {"transformer"}),
    ("controlnet", {}, {"transformer"}),
    ("textual_inversion", {}, {"text_encoder"}),
])
def test_frozen_parts_are_loaded_in_the_weight_dtype_never_in_fp32(trainer, extra, full_precision, tiny_models, shard_dir,
                                                                    tmp_path, monkeypatch):
    """A bf16 run loads FLUX.1's frozen parts (T5, and the transformer under LoRA) straight in bf16: as they come out of
    `from_pretrained`, before any cast, no weight but the model's own keep-in-fp32 modules (T5's `wo`) is fp32. What
    trains or seeds trained weights is loaded in fp32, even from a checkpoint stored in bf16 as FLUX.1's is: the full
    transformer, the transformer a new ControlNet copies, the CLIP whose rows Textual Inversion extends."""

    from sketch2real.training import controlnet, dreambooth, task, textual_inversion

    modules = {"dreambooth": (dreambooth.DreamBoothOptions, dreambooth.DreamBoothTask, {"instance_category": "cat"}),
               "controlnet": (controlnet.ControlNetOptions, controlnet.ControlNetTask, {}),
               "textual_inversion": (textual_inversion.TextualInversionOptions, textual_inversion.TextualInversionTask, {})}
    options, task_class, needed = modules[trainer]
    loaded = {}

    def load_and_stop(*args, **kwargs):
        components = load_sd_components(*args, **kwargs)
        for name in ("transformer", *components.family.text_encoders):
            model = getattr(components, "denoiser" if name == "transformer" else name)
            kept = getattr(model, "_keep_in_fp32_modules", None) or []
            loaded[name] = {p.dtype for n, p in model.named_parameters() if not any(k in n.split(".") for k in kept)}
        raise _Loaded

    load_sd_components = task.load_sd_components
    monkeypatch.setattr(task, "load_sd_components", load_and_stop)
    opts = options(pretrained_model_name_or_path=str(bf16_checkpoint(tiny_models.flux, tmp_path / "flux")),
                   shard_dir=str(shard_dir), output_dir=str(tmp_path), resolution=64, mixed_precision="bf16", **needed,
                   **extra)
    accelerator = in_process_accelerator("bf16")
    with pytest.raises(_Loaded):
        task_class(opts, accelerator)
    assert loaded.keys() == {"transformer", "text_encoder", "text_encoder_2"}
    for name, dtypes in loaded.items():
        assert dtypes == ({torch.float32} if name in full_precision else {torch.bfloat16}), name


@pytest.mark.parametrize("captions", [False, True])
def test_controlnet_frees_the_text_encoders_when_its_prompts_are_one_per_category(captions, tiny_models, shard_dir,
                                                                                 tmp_path):
    """ControlNet's prompts are one per category (and "") unless captions are given: they are encoded once and the
    encoders freed, T5 included (its conditionings are then the encoders' own); with per-sample captions (75k distinct
    prompts at full scale) the encoders stay."""
    import gc
    import weakref

    from sketch2real.family import FAMILIES
    from sketch2real.models import load_sd_components
    from sketch2real.training.controlnet import ControlNetOptions, ControlNetTask

    model, f = str(tiny_models.flux), FAMILIES["flux"]
    file = tmp_path / "captions.jsonl"
    from sketch2real.shards import sample_refs

    key = sample_refs(shard_dir, "train")[0].key  # one pair captioned: per-sample prompts
    file.write_text(json.dumps({"key": key, "prompt_id": "0", "caption": "a drawing"}) + "\n")
    opts = ControlNetOptions(pretrained_model_name_or_path=model, shard_dir=str(shard_dir), output_dir=str(tmp_path),
                             resolution=64, mixed_precision="bf16", num_heldout_samples=2, proportion_empty_prompts=0.5,
                             captions=str(file) if captions else "")
    accelerator = in_process_accelerator("bf16")
    components = load_sd_components(model)
    t5 = weakref.ref(components.text_encoder_2)
    task = ControlNetTask(opts, accelerator, components)
    gc.collect()
    if captions:
        assert t5() is not None
        return
    assert t5() is None and all(e is None for e in task.c.text_encoders)
    prompts = sorted({task.prompt_for(key, category, step) for key, category in zip(task.keys, task.categories)
                      for step in range(4)})
    assert "" in prompts and len(prompts) == len(set(task.categories)) + 1
    assert set(prompts) <= set(task.frozen_conditions)  # every training prompt was encoded before the release
    encoders = [e.to(torch.bfloat16) for e in load_sd_components(model).text_encoders]
    with torch.no_grad():
        for prompt in prompts:
            expected = f.encode(encoders, f.tokenize(components.tokenizers, [prompt]), 64)
            got = task.condition([prompt])
            assert torch.equal(got.states, expected.states) and torch.equal(got.pooled, expected.pooled), prompt


def test_zero3_gets_a_model_already_sharded_so_no_rank_holds_it_whole(tiny_models, shard_dir, tmp_path):
    """Under ZeRO-3 the trained model reaches DeepSpeed already sharded, one parameter at a time: when DeepSpeed's
    engine is handed it, no rank holds any parameter whole (DeepSpeed would move a whole module to each device before
    partitioning it: FLUX.1's 22 GiB transformer on every GPU at start-up). The run trains on (the matrix tests check
    what it trains)."""
    from .helpers import launch

    report = tmp_path / "startup"
    out = tmp_path / "out"
    launch("tests/probes/zero3_startup.py", report, REPO / "train/dreambooth.py",
           *db_args(tiny_models.flux, shard_dir), "--max_train_steps", "1", "--lora_rank", "4", "--validation_steps", "0",
           "--train_batch_size", "1", "--output_dir", out, deepspeed_config=DEEPSPEED_CONFIGS["zero3"],
           accelerate_precision=None)
    ranks = [json.loads((tmp_path / f"startup.rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["elements"] > 0 and seen["partitioned"] == seen["parameters"]
        assert seen["held_whole"] == 0, seen
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_what_a_family_does_not_have_is_refused_in_one_line(tiny_models, shard_dir, tmp_path):
    """FLUX.2 [klein]: --train_text_encoder (Qwen3 is read at inner layers) and Textual Inversion; SD 1.x:
    --enable_t5_ti. Refused in one line with exit status 2, before training."""
    model = tiny_models.flux2_klein
    proc = run_script("train/dreambooth.py", *db_args(model, shard_dir), "--train_text_encoder", "--output_dir",
                      tmp_path / "db", check=False)
    assert proc.returncode == 2 and "--train_text_encoder is not built for flux2-klein" in proc.stderr
    proc = run_script("train/textual_inversion.py", "--pretrained_model_name_or_path", model, "--shard_dir", shard_dir,
                      "--resolution", "64", "--output_dir", tmp_path / "ti", check=False)
    assert proc.returncode == 2 and "textual_inversion is not built for flux2-klein" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    proc = run_script("train/dreambooth.py", *db_args(model, shard_dir), "--lora_rank", "4", "--train_text_encoder_ti",
                      "--instance_prompt", "a TOK sketch of a cat", "--output_dir", tmp_path / "pivotal", check=False)
    assert proc.returncode == 2 and "--train_text_encoder_ti is not built for flux2-klein" in proc.stderr
    proc = run_script("train/textual_inversion.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir",
                      shard_dir, "--resolution", "64", "--enable_t5_ti", "--output_dir", tmp_path / "ti-sd", check=False)
    assert proc.returncode == 2 and "--enable_t5_ti: a sd model has no T5 encoder" in proc.stderr


@pytest.mark.parametrize("trainer", ["dreambooth", "controlnet", "textual_inversion"])
def test_fp16_on_a_bf16_family_is_refused_in_one_line_before_loading(trainer, tiny_models, shard_dir, tmp_path):
    """The flow families are bf16 models (T5 and the MM-DiTs overflow fp16): every trainer refuses fp16 in one line,
    before any weight is read (the folder holds FLUX.1's model_index.json only); SD 1.x still trains in fp16. So is a
    resolution the 2x2 patches do not divide."""
    import dataclasses
    import shutil

    from sketch2real.cli import UserError
    from sketch2real.family import FAMILIES
    from sketch2real.training import controlnet, dreambooth, textual_inversion

    model = tmp_path / "index-only"
    model.mkdir()
    shutil.copy(tiny_models.flux / "model_index.json", model)
    options, task_class, needed = {
        "dreambooth": (dreambooth.DreamBoothOptions, dreambooth.DreamBoothTask, {"instance_category": "cat"}),
        "controlnet": (controlnet.ControlNetOptions, controlnet.ControlNetTask, {}),
        "textual_inversion": (textual_inversion.TextualInversionOptions, textual_inversion.TextualInversionTask, {}),
    }[trainer]
    opts = options(pretrained_model_name_or_path=str(model), shard_dir=str(shard_dir), output_dir=str(tmp_path / "out"),
                   resolution=64, **needed)
    with pytest.raises(UserError, match="flux models train in bf16, not fp16"):
        task_class(opts, in_process_accelerator("fp16"))
    assert FAMILIES["sd"].fp16 and not any(FAMILIES[f].fp16 for f in ("sd3", "flux", "flux2-klein"))
    # and a resolution whose latents cannot be cut into 2x2 patches (a multiple of 8, not of 16)
    with pytest.raises(UserError, match="--resolution 72: flux models take a multiple of 16"):
        task_class(dataclasses.replace(opts, resolution=72), in_process_accelerator("bf16"))
    # Min-SNR weighs denoising losses: silently dropped on a flow family before
    with pytest.raises(UserError, match="--snr_gamma weighs denoising .* flux models train by flow matching"):
        task_class(dataclasses.replace(opts, snr_gamma=5.0), in_process_accelerator("bf16"))
    if trainer == "dreambooth":  # kohya's key format is built for the UNet families only
        with pytest.raises(UserError, match="--lora_format comfyui is built for SD 1.x and SDXL UNets, not flux"):
            task_class(dataclasses.replace(opts, lora_rank=4, lora_format="comfyui"), in_process_accelerator("bf16"))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_lokr_writes_simpletuner_names_that_merge_to_peft_s_update(family, tiny_models, shard_dir, tmp_path):
    """--lora_type lokr on the MM-DiTs: the file names each module as SimpleTuner's LyCORIS files do
    (`lycoris_<diffusers module path with _>`, which ComfyUI maps for SD3 and FLUX.1), merging it by ComfyUI's rule
    gives each module peft's own LoKr update (alpha != rank), and generation merges a trained file into exactly the
    adapted layers. FLUX.2 [klein] is refused in one line."""
    from peft import LoKrConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from sketch2real.family import FAMILIES
    from sketch2real.generation import load_generation_pipeline
    from sketch2real.lokr import merge_lokr, write_lokr
    from sketch2real.models import load_sd_components

    model = tiny(tiny_models, family)
    targets = FAMILIES[family].lora_targets(load_sd_components(str(model)).denoiser)

    def transformer():
        return load_sd_components(str(model)).denoiser

    adapted = transformer()
    adapted.add_adapter(LoKrConfig(r=4, alpha=3, target_modules=targets))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lokr_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    file = write_lokr(tmp_path, get_peft_model_state_dict(adapted), 3, 4, targets, FAMILIES[family].lokr_prefix)
    assert all(k.startswith(("lycoris_transformer_blocks_", "lycoris_single_transformer_blocks_")) for k in load_file(file))
    merged, base = transformer(), transformer().state_dict()
    changed = merge_lokr(merged, file)
    deltas = {name: module.get_delta_weight("default") for name, module in adapted.named_modules()
              if hasattr(module, "get_delta_weight") and hasattr(module, "lokr_w1")}
    assert changed == len(deltas) > 0
    for name, delta in deltas.items():
        got = merged.get_submodule(name).weight - base[f"{name}.weight"]
        assert delta.abs().max() > 1e-3 and torch.allclose(got, delta, atol=1e-6), name

    out = tmp_path / "trained"
    run_script("train/dreambooth.py", *db_args(model, shard_dir), "--output_dir", out, "--max_train_steps", "2",
               "--lora_rank", "4", "--lora_type", "lokr", "--learning_rate", "1e-2", "--validation_steps", "0",
               "--checkpointing_steps", "0")
    assert all(k.startswith("lycoris_") for k in load_file(out / "pytorch_lokr_weights.safetensors"))
    pipe = load_generation_pipeline(str(out), torch.device("cpu"), torch.float32)
    base_pipe = load_generation_pipeline(str(model), torch.device("cpu"), torch.float32)
    reference = base_pipe.transformer.state_dict()
    moved = {n.removesuffix(".weight") for n, p in pipe.transformer.named_parameters() if not torch.equal(p, reference[n])}
    assert moved and moved <= set(deltas), sorted(moved - set(deltas))[:4]
    if family == "flux":
        proc = run_script("train/dreambooth.py", *db_args(tiny_models.flux2_klein, shard_dir), "--output_dir",
                          tmp_path / "klein", "--lora_rank", "4", "--lora_type", "lokr", check=False)
        assert proc.returncode == 2 and "--lora_type lokr is built for" in proc.stderr


@pytest.mark.parametrize("family, encoders", [("sd3", ["text_encoder", "text_encoder_2"])])  # FLUX.1: the same code
def test_lora_with_train_text_encoder_adapts_the_clip_encoders_and_diffusers_reloads_them(family, encoders, tiny_models,
                                                                                         shard_dir, tmp_path):
    """As diffusers' SD3 and FLUX.1 LoRA scripts: the CLIP encoders get adapters (T5 stays frozen), saved in peft's
    names beside the transformer's; the family's pipeline loads them at their alpha."""
    import diffusers
    from safetensors.torch import load_file

    from sketch2real.family import FAMILIES

    model, out = tiny(tiny_models, family), tmp_path / "te"
    run_script("train/dreambooth.py", *db_args(model, shard_dir), "--lora_rank", "4", "--lora_alpha", "8",
               "--train_text_encoder", "--max_train_steps", "2", "--validation_steps", "0", "--checkpointing_steps", "0",
               "--output_dir", out)
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert sorted({k.split(".")[0] for k in saved}) == sorted([*encoders, "transformer"])
    pipe = getattr(diffusers, FAMILIES[family].pipeline).from_pretrained(model)
    pipe.load_lora_weights(out)
    assert [c.lora_alpha for name in encoders for c in getattr(pipe, name).peft_config.values()] == [8] * len(encoders)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_frozen_t5_conditions_in_train_mode_as_at_generation(family, tiny_models):
    """With the CLIP encoders training (their adapters, or pivotal rows), the frozen T5 sits in the trained module:
    `model.train()` must leave it in eval mode, or its dropout (0.1) perturbs every step's conditioning."""
    from transformers import AutoTokenizer

    from sketch2real.family import FAMILIES, TextEncoders
    from sketch2real.models import load_text_encoders

    f, model = FAMILIES[family], tiny(tiny_models, family)
    encoders = TextEncoders(f, load_text_encoders(f, str(model)), 64).requires_grad_(False)
    encoders.encoders["text_encoder"].requires_grad_(True)
    ids = f.tokenize([AutoTokenizer.from_pretrained(model, subfolder=name) for name in f.tokenizers], ["a sketch of a cat"])
    assert encoders.encoders["text_encoder_3" if family == "sd3" else "text_encoder_2"].config.dropout_rate > 0
    with torch.no_grad():
        expected = encoders.eval()(ids)
        trained = [encoders.train()(ids) for _ in range(2)]
    assert encoders.encoders["text_encoder"].training
    assert all(torch.equal(a, b) for run in trained for a, b in zip(run, expected))


@pytest.mark.parametrize("family, clips, t5", [("flux", ["text_encoder"], "text_encoder_2")])  # SD3: the same code
def test_full_train_text_encoder_trains_the_clip_encoders_and_leaves_t5_as_it_was(family, clips, t5, tiny_models,
                                                                                shard_dir, tmp_path):
    """As diffusers' SD3 and FLUX.1 DreamBooth scripts: --train_text_encoder trains the CLIP encoders; T5 (4.7B
    parameters at full size: its fp32 copy and Adam states would be 75 GB) stays frozen, and the saved pipeline holds
    the base's T5."""
    model, out = tiny(tiny_models, family), tmp_path / "full"
    run_script("train/dreambooth.py", *db_args(model, shard_dir), "--train_text_encoder", "--learning_rate", "1e-3",
               "--max_train_steps", "2", "--validation_steps", "0", "--checkpointing_steps", "0",
               "--num_heldout_samples", "0", "--output_dir", out)
    for name in [*clips, t5]:
        base, trained = weights(model / name), weights(out / name)
        changed = any(not torch.equal(base[k], trained[k]) for k in base)
        assert changed == (name != t5), name


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_generation_samples_with_the_flow_objective_or_refuses_a_noise_sampler(family, tiny_models):
    """--scheduler euler is the flow families' own flow-matching Euler (the pipeline's scheduler, its config unchanged);
    a noise-prediction sampler (dpm++: noise on SD3, a traceback on FLUX.1 at its first step) is one line before any
    weight loads; so is a size their patches cannot take (SD3: a traceback; FLUX.1 drew 32 px and recorded 40)."""
    from diffusers import DiffusionPipeline

    from sketch2real.cli import UserError
    from sketch2real.generation import load_generation_pipeline

    model, cpu = str(tiny(tiny_models, family)), torch.device("cpu")
    with pytest.raises(UserError, match=f"--scheduler dpm\\+\\+ does not fit {family} models"):
        load_generation_pipeline(model, cpu, torch.float32, scheduler="dpm++")
    with pytest.raises(UserError, match="40 is not a multiple of 16"):
        load_generation_pipeline(model, cpu, torch.float32, sizes=(40, 32))
    own = DiffusionPipeline.from_pretrained(model).scheduler
    euler = load_generation_pipeline(model, cpu, torch.float32, scheduler="euler").scheduler
    assert type(euler) is type(own) and dict(euler.config) == dict(own.config)


def test_sd3_generation_and_card_spell_out_multi_vector_tokens_as_training_does(tiny_models, tmp_path):
    """SD3's pipelines have no Textual Inversion loader to expand `<s0>` into its rows' names: generation gave the
    pipeline `a <s0> sketch` (half the trained rows) where training conditioned on `a <s0> <s0>_1 sketch`; it and
    the model card's diffusers lines now spell it out (SD 1.x's pipeline, which expands it itself, gets it as is)."""
    from types import SimpleNamespace

    from diffusers import DiffusionPipeline

    from sketch2real.family import SD3, append_token_rows
    from sketch2real.generation import Item, generate_batch
    from sketch2real.training.model_card import usage

    settings = {"height": 32, "width": 32, "num_inference_steps": 1, "guidance_scale": 1.0}
    for model, expected in ((tiny_models.sd3, "a <s0> <s0>_1 sketch of a cat"), (tiny_models.sd, "a <s0> sketch of a cat")):
        pipe = DiffusionPipeline.from_pretrained(model)
        append_token_rows(pipe.tokenizer, pipe.text_encoder, "<s0>", torch.zeros(2, pipe.text_encoder.config.hidden_size))
        seen = {}
        pipe.__class__ = type(type(pipe).__name__, (type(pipe),),  # the same pipeline, recording what it is given
                              {"__call__": lambda self, seen=seen, **kwargs: seen.update(kwargs) or SimpleNamespace(images=[])})
        generate_batch(pipe, [Item(key="k", prompt="a <s0> sketch of a cat")], 0, settings)
        assert seen["prompt"] == [expected]
    # the card's lines, plain diffusers and transformers (they imported sketch2real's loader): run as a reader runs them
    from sketch2real.training.textual_inversion import write_learned_embeds

    base = DiffusionPipeline.from_pretrained(tiny_models.sd3)
    rows = [torch.randn(2, encoder.get_input_embeddings().weight.shape[1], generator=torch.Generator().manual_seed(i))
            for i, encoder in enumerate((base.text_encoder, base.text_encoder_2))]
    write_learned_embeds(SD3, "<s0>", rows, tmp_path / "learned_embeds.safetensors")
    card = usage("embeddings", str(tiny_models.sd3), tmp_path, "a <s0> sketch of a cat", SD3)
    code = card.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert "sketch2real" not in code
    assert "pipe(prompt='a <s0> <s0>_1 sketch of a cat', guidance_scale=7.0, max_sequence_length=77)" in code
    names: dict = {}
    exec(code.replace("max_sequence_length=77)", "max_sequence_length=77, num_inference_steps=1)"), names)  # noqa: S102
    for (tokenizer, encoder), trained in zip(((names["pipe"].tokenizer, names["pipe"].text_encoder),
                                              (names["pipe"].tokenizer_2, names["pipe"].text_encoder_2)), rows):
        ids = tokenizer.convert_tokens_to_ids(["<s0>", "<s0>_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], trained)
    # generate.py's index says what the pipeline got: the README's redraw, pipe(prompt=row['pipeline_prompt'], ...)
    run_script("infer/generate.py", "--pretrained_model_name_or_path", tiny_models.sd3, "--textual_inversion",
               tmp_path / "learned_embeds.safetensors", "--prompts", "a <s0> sketch of a cat", "--height", "32", "--width",
               "32", "--num_inference_steps", "1", "--output_dir", tmp_path / "gen")
    row = json.loads((tmp_path / "gen" / "index.jsonl").read_text())
    assert (row["prompt"], row["pipeline_prompt"]) == ("a <s0> sketch of a cat", "a <s0> <s0>_1 sketch of a cat")


def test_max_sequence_length_conditions_training_and_validation_and_is_one_line_where_prompts_are_clip_s(
        tiny_models, shard_dir, tmp_path):
    """--max_sequence_length (diffusers' SD3/FLUX scripts' flag, for long prompts such as captions): T5's states in
    the conditioning have that length (SD3: CLIP's 77 positions, then T5's), and validation images are the pipeline's
    at that length (its default, 256, or training's 77, would draw others); SD 1.x (CLIP only) refuses it."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline

    from sketch2real.cli import UserError
    from sketch2real.family import FAMILIES
    from sketch2real.models import load_sd_components
    from sketch2real.training.dreambooth import DreamBoothOptions, DreamBoothTask
    from sketch2real.training.validation import generate_rows

    model = str(tiny_models.sd3)
    opts = DreamBoothOptions(pretrained_model_name_or_path=model, shard_dir=str(shard_dir), output_dir=str(tmp_path),
                             instance_category="cat", instance_prompt="a sks sketch of a cat", resolution=64,
                             lora_rank=4, num_heldout_samples=0, num_validation_images=1, validation_inference_steps=2,
                             max_sequence_length=96)
    task = DreamBoothTask(opts, in_process_accelerator("no"), load_sd_components(model))
    assert task.family.max_sequence_length == 96 and FAMILIES["sd3"].max_sequence_length == 77
    assert task.condition(["a sks sketch of a cat"]).states.shape[1] == 77 + 96
    with task.resident_text_encoders():
        rows, _, _ = task.validation_images(task.model)
    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    drawn = {length: np.asarray(generate_rows(pipe, ["a sks sketch of a cat"], 1, opts.seed, 64, 2,
                                              {"max_sequence_length": length})[0][0]) for length in (96, 77)}
    assert np.array_equal(np.asarray(rows[0][0]), drawn[96]) and not np.array_equal(drawn[96], drawn[77])
    with pytest.raises(UserError, match="--max_sequence_length sets the T5/Qwen prompt length .* sd models read"):
        DreamBoothTask(DreamBoothOptions(**{**opts.__dict__, "pretrained_model_name_or_path": str(tiny_models.sd)}),
                       in_process_accelerator("no"))


def test_a_run_s_max_sequence_length_reaches_its_card_and_generation_from_its_output(tiny_models, shard_dir, tmp_path):
    """A LoRA trained with --max_sequence_length 96: its card's diffusers lines pass 96, and generation from its
    output prompts at 96 (recorded in run_config.json; the index says so), the images of an explicit
    --max_sequence_length 96 and not those of 77; SD 1.x refuses the flag in one line, before any weight loads."""
    out = tmp_path / "lora"
    run_script("train/dreambooth.py", *db_args(tiny_models.sd3, shard_dir), "--lora_rank", "4", "--max_train_steps",
               "1", "--num_validation_images", "0", "--num_heldout_samples", "0", "--max_sequence_length", "96",
               "--output_dir", out)
    assert json.loads((out / "run_config.json").read_text())["max_sequence_length"] == 96
    assert "max_sequence_length=96).images[0]" in (out / "README.md").read_text()
    images = {}
    for name, extra in (("recorded", []), ("96", ["--max_sequence_length", "96"]), ("77", ["--max_sequence_length", "77"])):
        gen = tmp_path / f"gen-{name}"
        run_script("infer/generate.py", "--pretrained_model_name_or_path", out, "--prompts", "a sks sketch of a cat",
                   "--height", "32", "--width", "32", "--num_inference_steps", "2", "--output_dir", gen, *extra)
        (row,) = [json.loads(line) for line in (gen / "index.jsonl").read_text().splitlines()]
        assert row["settings"]["max_sequence_length"] == (77 if name == "77" else 96)
        images[name] = (gen / row["image"]).read_bytes()
    assert images["recorded"] == images["96"] != images["77"]
    for script, args in (("train/dreambooth.py", [*db_args(tiny_models.sd, shard_dir), "--output_dir", tmp_path / "sd"]),
                         ("infer/generate.py", ["--pretrained_model_name_or_path", tiny_models.sd, "--prompts", "a cat",
                                                "--output_dir", tmp_path / "gen-sd"])):
        proc = run_script(script, *args, "--max_sequence_length", "96", check=False)
        assert proc.returncode == 2 and "sd models read prompts of CLIP's 77 tokens only" in proc.stderr.strip().splitlines()[-1]
        assert "Traceback" not in proc.stderr


def test_generation_reads_the_length_each_trained_part_recorded_and_refuses_two(tmp_path):
    """The trained parts behind a generation (model or LoRA folder, a checkpoint of one, ControlNet, embeddings file)
    say their run's --max_sequence_length; two that differ cannot both be matched: one line."""
    from sketch2real.cli import UserError
    from sketch2real.generation import trained_sequence_length

    for name, length in (("lora", 96), ("controlnet", 128), ("ti", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run_config.json").write_text(json.dumps({"max_sequence_length": length}))
    (tmp_path / "lora" / "checkpoint-4").mkdir()
    (tmp_path / "ti" / "learned_embeds.safetensors").touch()
    embeds = str(tmp_path / "ti" / "learned_embeds.safetensors")
    assert trained_sequence_length(["org/base-model", str(tmp_path / "lora" / "checkpoint-4"), "", embeds]) == 96
    assert trained_sequence_length([str(tmp_path / "ti"), embeds]) is None
    with pytest.raises(UserError, match="trained with different prompt lengths .*lora: 96, .*controlnet: 128"):
        trained_sequence_length([str(tmp_path / "lora"), str(tmp_path / "controlnet")])


def test_captions_longer_than_the_text_encoder_reads_are_counted_in_a_warning(tiny_models, caplog):
    """Captions (LLaVA's run long) past the family's last encoder's limit are counted in one warning that says what
    reads more: SD's CLIP cuts at 77, SD3's T5 at 77 unless --max_sequence_length says more."""
    import logging

    from sketch2real.family import FAMILIES
    from sketch2real.models import load_sd_components
    from sketch2real.training.prompts import SamplePrompts

    prompts = SamplePrompts("a {category}", {"k1": "a cat " * 45, "k2": "a cat", "k3": "a dog " * 45})
    cases = [(FAMILIES["sd"], tiny_models.sd, "2 of 3 captions are longer than the 77 tokens", "CLIP reads no more"),
             (FAMILIES["sd3"], tiny_models.sd3, "2 of 3 captions are longer than the 77 tokens", "--max_sequence_length"),
             (FAMILIES["sd3"].with_max_sequence_length(128), tiny_models.sd3, None, None)]
    for family, model, said, advice in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sketch2real"):
            prompts.warn_cut(family, load_sd_components(str(model)).tokenizers, ["k1", "k2", "k3", "k4"])
        warned = [r.getMessage() for r in caplog.records if "captions are longer" in r.getMessage()]
        assert (warned == [] if said is None else len(warned) == 1 and said in warned[0] and advice in warned[0]), warned


def test_t5_textual_inversion_loads_t5_in_the_weight_dtype(tiny_models):
    """--enable_t5_ti loaded T5 in fp32 to start its new rows from fp32 embeddings: T5-XXL's 18 GB per process (and a
    cast copy) where bf16 holds 9. CLIP's small encoders still load in fp32 for theirs."""
    from types import SimpleNamespace

    from sketch2real.family import family_of
    from sketch2real.models import load_sd_components
    from sketch2real.training.textual_inversion import TextualInversionTask

    family = family_of(str(tiny_models.flux))
    keep = TextualInversionTask.full_precision_components(SimpleNamespace(opts=SimpleNamespace(enable_t5_ti=True)), family)
    c = load_sd_components(str(tiny_models.flux), frozen_dtype=torch.bfloat16, keep_full_precision=keep)
    assert [encoder.dtype for encoder in c.text_encoders] == [torch.float32, torch.bfloat16]


def test_t5_textual_inversion_checkpoints_and_resumes_exactly(tiny_models, shard_dir, tmp_path):
    """--enable_t5_ti: T5's tied `shared` and `encoder.embed_tokens` hold one placeholder embedding, whose trained rows
    the checkpoint holds once (safetensors refused the two names of one tensor: no checkpoint could be saved, with an
    empty message); a run resumed from its checkpoint ends with the rows of the run never stopped."""
    import shutil

    from safetensors.torch import load_file

    args = ["--enable_t5_ti", "--pretrained_model_name_or_path", tiny_models.flux, "--shard_dir", shard_dir,
            "--resolution", "64", "--categories", "cat", "--learning_rate", "5e-2", "--max_train_steps", "2",
            "--checkpointing_steps", "1", "--num_validation_images", "0", "--num_heldout_samples", "0",
            "--report_to", "none"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script("train/textual_inversion.py", *args, "--output_dir", straight)
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    run_script("train/textual_inversion.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
    a, b = (load_file(run / "learned_embeds.safetensors") for run in (straight, resumed))
    assert sorted(a) == ["clip_l", "t5"] and all(torch.equal(a[k], b[k]) for k in a)


def test_flux_multi_vector_textual_inversion_conditions_as_the_pipeline_with_the_file_loaded(tiny_models, shard_dir,
                                                                                              tmp_path):
    """A multi-vector token on FLUX.1 without --enable_t5_ti: FluxPipeline's loader spells it out for CLIP only, T5
    reads the prompt as written; training conditioned T5 on `<sketch> <sketch>_1`. Now the training conditioning is
    the pipeline's `encode_prompt` with the run's file loaded, bit for bit."""
    from diffusers import FluxPipeline

    from sketch2real.family import FAMILIES, load_textual_inversion
    from sketch2real.models import load_sd_components
    from sketch2real.training.textual_inversion import TextualInversionOptions, TextualInversionTask, write_learned_embeds

    model = str(tiny_models.flux)
    opts = TextualInversionOptions(pretrained_model_name_or_path=model, shard_dir=str(shard_dir), output_dir=str(tmp_path),
                                   resolution=64, num_vectors=2, categories=["cat"], num_heldout_samples=0,
                                   num_validation_images=0)
    task = TextualInversionTask(opts, in_process_accelerator("no"), load_sd_components(model))
    prompt = "a cat in the style of <sketch>"
    with torch.no_grad():
        text = task.condition([prompt], task.model)
    write_learned_embeds(FAMILIES["flux"], "<sketch>", [e.new_rows.detach() for e in task.embeddings],
                         tmp_path / "learned_embeds.safetensors")
    pipe = FluxPipeline.from_pretrained(model)
    load_textual_inversion(pipe, str(tmp_path / "learned_embeds.safetensors"))
    with torch.no_grad():
        states, pooled, _ = pipe.encode_prompt(prompt, None, **FAMILIES["flux"].generation_kwargs())
    assert torch.equal(text.pooled, pooled) and torch.equal(text.states, states)


@pytest.mark.parametrize("t5", [False, True])
def test_the_card_s_embedding_lines_load_flux_rows_with_diffusers_alone_as_the_project_s_loader(t5, tiny_models, tmp_path):
    """The card loads a FLUX.1 Textual Inversion file (CLIP-L's rows, and T5's with --enable_t5_ti) with diffusers'
    own loader, no sketch2real import: the encoders' rows equal those `load_textual_inversion` gives."""
    from diffusers import FluxPipeline

    from sketch2real.family import FAMILIES, load_textual_inversion
    from sketch2real.training.model_card import embedding_lines
    from sketch2real.training.textual_inversion import write_learned_embeds

    model, file = str(tiny_models.flux), tmp_path / "learned_embeds.safetensors"
    ours, theirs = FluxPipeline.from_pretrained(model), FluxPipeline.from_pretrained(model)
    widths = [ours.text_encoder.config.hidden_size, *([ours.text_encoder_2.config.d_model] if t5 else [])]
    write_learned_embeds(FAMILIES["flux"], "<sketch>", [torch.randn(2, w) for w in widths], file)
    load_textual_inversion(ours, str(file))
    imports, lines = embedding_lines(FAMILIES["flux"], file, repr(str(file)))
    assert not any("sketch2real" in line for line in imports)
    exec("\n".join([*imports, *lines]), {"pipe": theirs})  # noqa: S102  (the card's lines)
    for encoder, tokenizer in [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")][: len(widths)]:
        rows = [getattr(p, encoder).get_input_embeddings().weight[getattr(p, tokenizer).convert_tokens_to_ids(
            ["<sketch>", "<sketch>_1"])] for p in (ours, theirs)]
        assert torch.equal(*rows) and rows[0].abs().sum() > 0, encoder


def test_sd3_prompts_shorter_than_clip_s_cut_t5_only_as_the_pipeline_does(tiny_models):
    """--max_sequence_length below 77 on SD3: StableDiffusion3Pipeline gives its CLIPs 77 tokens whatever the length
    and cuts T5 there; training cut the CLIPs too (other states, another pooled embedding)."""
    from diffusers import StableDiffusion3Pipeline

    from sketch2real.family import FAMILIES

    f = FAMILIES["sd3"].with_max_sequence_length(16)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_models.sd3)
    prompt = "a sks sketch of a cat on a mat beside a dog under a tree in the rain"
    with torch.no_grad():
        text = f.encode([getattr(pipe, n) for n in f.text_encoders],
                        f.tokenize([getattr(pipe, n) for n in f.tokenizers], [prompt]), 64)
        states, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False,
                                                  **f.generation_kwargs())
    assert text.states.shape[1] == 77 + 16 and torch.equal(text.states, states) and torch.equal(text.pooled, pooled)


def test_t5_learning_token_rows_checkpoints_its_layers_without_dropout(tiny_models, shard_dir, tmp_path):
    """An encoder learning only new token rows (T5 with --enable_t5_ti) conditions without dropout, as at generation,
    but its layers stay in train mode, where transformers checkpoints them (--gradient_checkpointing was lost)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from sketch2real.models import load_sd_components
    from sketch2real.training.textual_inversion import TextualInversionOptions, TextualInversionTask

    model = str(tiny_models.flux)
    opts = TextualInversionOptions(pretrained_model_name_or_path=model, shard_dir=str(shard_dir), output_dir=str(tmp_path),
                                   resolution=64, enable_t5_ti=True, gradient_checkpointing=True, categories=["cat"],
                                   num_heldout_samples=0, num_validation_images=0)
    task = TextualInversionTask(opts, in_process_accelerator("no"), load_sd_components(model))
    task.model.train()
    for encoder in task.model.encoders.values():
        layers = [m for m in encoder.modules() if isinstance(m, GradientCheckpointingLayer)]
        dropouts = [m for m in encoder.modules() if isinstance(m, torch.nn.Dropout)]
        assert layers and all(m.training and m.gradient_checkpointing for m in layers)
        assert not any(m.training for m in dropouts) and not encoder.training
    prompt = "a cat in the style of <sketch>"
    first, second = (task.condition([prompt], task.model).states for _ in range(2))
    assert torch.equal(first, second)  # no dropout


def test_text_encoders_state_dict_holds_each_tied_parameter_once(tiny_models):
    """T5's `shared` and `encoder.embed_tokens` are one embedding: the state dict (what every checkpoint saves, DDP's
    and DeepSpeed's too) names it once, so safetensors saves it and DeepSpeed's frozen-parameter filter drops it."""
    from sketch2real.family import FAMILIES, TextEncoders
    from sketch2real.models import load_sd_components

    c = load_sd_components(str(tiny_models.flux))
    model = TextEncoders(FAMILIES["flux"], c.text_encoders, 64)
    keys = set(model.state_dict())
    assert "encoders.text_encoder_2.shared.weight" in keys
    assert not any(k.startswith("encoders.text_encoder_2.encoder.embed_tokens.") for k in keys)
    assert {name for name, _ in model.named_parameters()} <= keys  # every parameter, by its first name
