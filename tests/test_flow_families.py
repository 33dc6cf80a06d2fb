"""The flow-matching families, read from the model: SD3 (an MM-DiT, three text encoders) and FLUX.1 (packed latents,
CLIP pooled + T5, guidance embedding), both with a 16-channel VAE with a shift; the same scripts, loop and guarantees
as SD 1.x and SDXL. The objective is checked against the formulas of diffusers' SD3/FLUX scripts, and the family's
conditioning and denoiser call against the pipelines' own; DreamBooth runs the bf16 launcher matrix, resumes exactly,
and its outputs load in plain diffusers."""

import json

import pytest
import torch

from .helpers import LAUNCHERS, SHARP_ADAM, assert_agrees_within_bf16, run_matrix_case, run_script, weights


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
FLOW_CASES = [(family, launcher, "lora") for family in ("sd3", "flux") for launcher in LAUNCHERS] + [
    ("sd3", "1", "full"), ("sd3", "zero3", "full")]  # SD3.5 Medium's full fine-tuning


@pytest.mark.parametrize("family, launcher, variant", FLOW_CASES)
def test_flow_dreambooth_bf16(family, launcher, variant, tiny_models, shard_dir, tmp_path, tmp_path_factory):
    """DreamBooth on a tiny SD3 and FLUX.1: LoRA on every launcher (and SD3's full transformer), fp32 trained weights,
    2 processes agreeing with 1 as on SD 1.x, outputs that load in the plain diffusers pipeline (+ load_lora_weights)."""
    import diffusers

    from sketch2real.family import FAMILIES

    model, pipeline = getattr(tiny_models, family), getattr(diffusers, FAMILIES[family].pipeline)
    extra = ["--lora_rank", "4"] if variant == "lora" else []
    out, one, one_fp32 = run_matrix_case(launcher, f"{family}-{variant}", "train/dreambooth.py",
                                         [*db_args(model, shard_dir), *FLOW_MATRIX, *extra], tmp_path, tmp_path_factory)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["heldout_loss"] == metrics["heldout_loss"]
    assert (out / "validation" / "step-000002.png").is_file()
    if variant == "lora":
        pipe = pipeline.from_pretrained(model)
        pipe.load_lora_weights(out)
        a, b, a32 = ({k: v for k, v in weights(run).items() if "lora_B" in k or "lora.up" in k}
                     for run in (one, out, one_fp32))
        assert a and {v.dtype for v in b.values()} == {torch.float32} and a.keys() == b.keys()
        assert all(k.startswith("pytorch_lora_weights.safetensors:transformer.") for k in b)
        assert_agrees_within_bf16(a, b, a32, {k: torch.zeros_like(v) for k, v in a.items()})
    else:
        pipe = pipeline.from_pretrained(out)
        base = weights(model / "transformer")
        trained = weights(out / "transformer")
        assert {v.dtype for v in trained.values()} == {torch.float32}
        assert_agrees_within_bf16(weights(one / "transformer"), trained, weights(one_fp32 / "transformer"), base)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a sks sketch of a cat", height=64, width=64, num_inference_steps=2,
                 **FAMILIES[family].generation_kwargs(), output_type="np").images[0]
    assert image.shape == (64, 64, 3)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_resume_continues_exactly_and_two_processes_match_one(family, shard_dir, tmp_path, tiny_models):
    """Killed after a checkpoint and resumed: bit-identical adapters; and 2 DDP processes (fp32) give the 1-process
    adapters (the same global batches, noise and flow-matching timesteps); the LoRA folder generates as a model."""
    import shutil

    from .helpers import launch, relative_difference

    args = [*db_args(getattr(tiny_models, family), shard_dir), "--max_train_steps", "4", "--checkpointing_steps", "2",
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
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)  # it trained
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


@pytest.mark.parametrize("script, extra", [
    ("train/textual_inversion.py", ["--placeholder_token", "<sketch>", "--initializer_token", "sketch"]),
    ("train/controlnet.py", []),
])
def test_trainers_not_built_for_sd3_say_so_in_one_line(script, extra, tiny_models, shard_dir, tmp_path):
    """Before any weight is loaded: a folder holding only SD3's model_index.json gets the same line."""
    import shutil

    model = tmp_path / "index-only"
    model.mkdir()
    shutil.copy(tiny_models.sd3 / "model_index.json", model)
    args = ["--pretrained_model_name_or_path", model, "--shard_dir", shard_dir, "--resolution", "64"]
    proc = run_script(script, *args, *extra, "--output_dir", tmp_path / "out", "--max_train_steps", "1", check=False)
    assert proc.returncode == 2 and "not built for sd3 models yet" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
