import json

import pytest
import torch
from safetensors.torch import load_file

from .helpers import (
    LAUNCHERS,
    SHARP_ADAM,
    assert_agrees_within_bf16,
    check_model_card_usage,
    launch,
    run_matrix_case,
    run_script,
)


@pytest.fixture
def ti_args(tiny_models, shard_dir):
    return ["--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir, "--resolution", "64",
            "--learning_rate", "5e-2", "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none"]


def _style_loss(pipe, shard_dir) -> float:
    from diffusers import DDPMScheduler

    from sketch2real.training.data import load_shard_images
    from sketch2real.training.diffusion import DenoisingObjective, tokenize
    from sketch2real.training.validation import heldout_denoising_loss

    images, _ = load_shard_images(str(shard_dir), "train", "cat", "sketch", 64)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def predict(noisy, timesteps, prompts):
        return pipe.unet(noisy, timesteps, pipe.text_encoder(tokenize(pipe.tokenizer, prompts))[0]).sample

    with torch.no_grad():
        return heldout_denoising_loss(predict, pipe.vae, DenoisingObjective(scheduler), images, ["a cat in the style of <sketch>"] * len(images), seed=5)


def test_only_the_new_rows_train_and_the_token_works_in_plain_diffusers(ti_args, tiny_models, shard_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "ti"
    run_script("train/textual_inversion.py", *ti_args, "--output_dir", out, "--max_train_steps", "40",
               "--train_batch_size", "4", "--categories", "cat", "--save_as_full_pipeline", "--checkpointing_steps", "20")
    embeds = load_file(out / "learned_embeds.safetensors")
    assert list(embeds) == ["<sketch>"] and embeds["<sketch>"].shape == (1, 32)
    assert (out / "learned_embeds-steps-20.safetensors").is_file()

    base = StableDiffusionPipeline.from_pretrained(tiny_models.sd)
    full = StableDiffusionPipeline.from_pretrained(out)
    vocab = len(base.tokenizer)
    base_te, full_te = base.text_encoder.state_dict(), full.text_encoder.state_dict()
    for name, tensor in base_te.items():
        if tensor.shape[0] == vocab and "embed" in name:  # the token embedding: old rows bitwise equal, one row added
            assert full_te[name].shape[0] == vocab + 1 and torch.equal(full_te[name][:vocab], tensor)
            assert torch.equal(full_te[name][vocab], embeds["<sketch>"][0])
        else:
            assert torch.equal(full_te[name], tensor), name
    for module in ("unet", "vae"):
        a, b = getattr(base, module).state_dict(), getattr(full, module).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    prompt, card = check_model_card_usage(out, shard_dir, tmp_path)  # the card's command and diffusers lines
    assert "<sketch>" in prompt and card["image"].size == (64, 64)

    # Loaded into a plain pipeline, the token lowers the style loss compared with its initial value and changes images.
    initial = base.text_encoder.get_input_embeddings().weight[base.tokenizer.convert_tokens_to_ids("sketch</w>")].detach()
    start = StableDiffusionPipeline.from_pretrained(tiny_models.sd)
    start.load_textual_inversion({"<sketch>": initial[None].clone()}, token="<sketch>")
    trained = StableDiffusionPipeline.from_pretrained(tiny_models.sd)
    trained.load_textual_inversion(out / "learned_embeds.safetensors")
    assert _style_loss(trained, shard_dir) < _style_loss(start, shard_dir)
    kwargs = dict(height=64, width=64, num_inference_steps=3, output_type="np", guidance_scale=7.5)
    for pipe in (start, trained):
        pipe.set_progress_bar_config(disable=True)
    a = start("a cat in the style of <sketch>", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = trained("a cat in the style of <sketch>", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(a - b).max() > 1e-4


def test_multi_vector_resume_is_exact(ti_args, tmp_path):
    import shutil

    common = [*ti_args, "--max_train_steps", "6", "--checkpointing_steps", "3", "--num_vectors", "2"]
    run_script("train/textual_inversion.py", *common, "--output_dir", tmp_path / "a")
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    run_script("train/textual_inversion.py", *common, "--output_dir", tmp_path / "b", "--resume_from_checkpoint", "latest")
    a, b = load_file(tmp_path / "a" / "learned_embeds.safetensors"), load_file(tmp_path / "b" / "learned_embeds.safetensors")
    assert a["<sketch>"].shape == (2, 32) and torch.equal(a["<sketch>"], b["<sketch>"])


@pytest.mark.parametrize("deepspeed", [None, "accelerate_configs/deepspeed_zero2.yaml"])
def test_two_processes_agree_with_one(ti_args, tmp_path, deepspeed):
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("train/textual_inversion.py", *ti_args, "--output_dir", one, "--max_train_steps", "4", "--train_batch_size", "2")
    launch("train/textual_inversion.py", *ti_args, "--output_dir", two, "--max_train_steps", "4", "--train_batch_size", "1",
           deepspeed_config=deepspeed)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["distributed_type"] == ("DEEPSPEED" if deepspeed else "MULTI_CPU")
    a, b = load_file(one / "learned_embeds.safetensors")["<sketch>"], load_file(two / "learned_embeds.safetensors")["<sketch>"]
    assert (a - b).norm() / a.norm() < 1e-3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--placeholder_token", "cat"], "already in the vocabulary"),
        # CLIP lowercases prompts: <Sketch> trained on all its vectors was drawn with its first one only (and "Cat"
        # matched every "cat" of every prompt)
        (["--placeholder_token", "<Sketch>"], "lowercases prompts, so diffusers' loader never finds a token with "
                                              "capitals; give '<sketch>'"),
        (["--placeholder_token", "Cat"], "give 'cat'"),
        (["--initializer_token", "qxzvw"], "is not a single token"),
        (["--num_vectors", "0"], "--num_vectors must be at least 1"),
        (["--learnable_property", "texture"], "--learnable_property must be"),
        (["--categories", "unicorn"], "unknown category 'unicorn'"),
    ],
)
def test_bad_flags(ti_args, tmp_path, extra, message):
    proc = run_script("train/textual_inversion.py", *ti_args, "--output_dir", tmp_path, "--max_train_steps", "1", *extra,
                      check=False)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1500:]


@pytest.mark.parametrize("launcher", [*LAUNCHERS, "zero3_partitioned"])
def test_bf16_matrix(launcher, ti_args, tiny_models, tmp_path, tmp_path_factory):
    """bf16 under every launcher; ZeRO-3 with even the new rows partitioned saves the gathered fp32 rows."""
    from diffusers import StableDiffusionPipeline

    common = [*ti_args, *SHARP_ADAM, "--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "2",
              "--num_validation_images", "1", "--validation_inference_steps", "2", "--num_heldout_samples", "2",
              "--categories", "cat", "apple"]
    out, one, one_fp32 = run_matrix_case(launcher, "ti", "train/textual_inversion.py", common, tmp_path, tmp_path_factory)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_loss"] == metrics["heldout_loss"] and (out / "validation" / "step-000002.png").is_file()
    rows = load_file(out / "learned_embeds.safetensors")["<sketch>"]
    assert rows.shape == (1, 32) and rows.dtype == torch.float32
    assert load_file(out / "learned_embeds-steps-1.safetensors")["<sketch>"].shape == (1, 32)  # saved at the checkpoint
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd)
    initial = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("sketch</w>")].detach()
    pipe.load_textual_inversion(out / "learned_embeds.safetensors")
    embeds = [{"rows": load_file(run / "learned_embeds.safetensors")["<sketch>"]} for run in (one, one_fp32)]
    assert_agrees_within_bf16(embeds[0], {"rows": rows}, embeds[1], {"rows": initial[None]})


@pytest.mark.parametrize("launcher", ["1", "ddp", "zero3"])
def test_sdxl_token_in_both_encoders_loads_as_diffusers_documents(launcher, tiny_models, shard_dir, tmp_path, tmp_path_factory):
    """SDXL: the token gets rows in both text encoders; saved as one file with clip_l and clip_g (the format that
    diffusers' documentation loads with two load_textual_inversion calls, and A1111/kohya read); 2 processes agree."""
    from diffusers import StableDiffusionXLPipeline

    args = ["--pretrained_model_name_or_path", tiny_models.sdxl, "--shard_dir", shard_dir, "--resolution", "64",
            "--learning_rate", "5e-2", "--report_to", "none", "--categories", "cat", "apple", *SHARP_ADAM,
            "--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "2", "--num_validation_images", "1",
            "--validation_inference_steps", "2", "--num_heldout_samples", "2", "--num_vectors", "2"]
    out, one, one_fp32 = run_matrix_case(launcher, "ti-sdxl", "train/textual_inversion.py", args, tmp_path, tmp_path_factory)
    saved = load_file(out / "learned_embeds.safetensors")
    assert set(saved) == {"clip_l", "clip_g"} and all(v.shape == (2, 32) and v.dtype == torch.float32 for v in saved.values())
    assert set(load_file(out / "learned_embeds-steps-1.safetensors")) == {"clip_l", "clip_g"}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
    initial = {key: encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("sketch</w>")].detach()[None]
               for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder),
                                               ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2))}
    pipe.load_textual_inversion(saved["clip_l"], token="<sketch>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(saved["clip_g"], token="<sketch>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder), ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
        rows = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(["<sketch>", "<sketch>_1"])]
        assert torch.equal(rows, saved[key])
        assert not torch.allclose(saved[key], initial[key].expand(2, -1))  # both encoders' rows trained
        reference, reference32 = (load_file(run / "learned_embeds.safetensors")[key] for run in (one, one_fp32))
        assert_agrees_within_bf16({"rows": reference}, {"rows": saved[key]}, {"rows": reference32},
                                  {"rows": initial[key].expand(2, -1)})
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat in the style of <sketch>", height=64, width=64, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_category_in_the_validation_prompt_is_filled_in_per_category_and_the_card_prompt_too(tmp_path):
    """--validation_prompt 'a {category} in the style of <sketch>' was drawn (and suggested by the model card) braces
    and all: now a row per category of the run (the first four), as DreamBooth's; a misspelt field, or {category}
    with --train_data_dir (images without categories), is refused in one line."""
    from sketch2real.cli import UserError, parse_options
    from sketch2real.training.textual_inversion import TextualInversionOptions, TextualInversionTask

    def task(*args: str) -> TextualInversionTask:
        opts = parse_options(TextualInversionOptions, ["--pretrained_model_name_or_path", "m", "--output_dir",
                                                       str(tmp_path), "--shard_dir", "s", *args])
        opts.check()
        bare = TextualInversionTask.__new__(TextualInversionTask)  # the prompts need only the options and categories
        bare.opts, bare.categories = opts, ["dog", "cat", "apple", "car_(sedan)", "airplane", "cat"]
        return bare

    filled = task("--validation_prompt", "a {category} in the style of <sketch>", "a <sketch>")
    assert filled.validation_rows() == [
        ("a airplane in the style of <sketch>", "airplane"), ("a apple in the style of <sketch>", "apple"),
        ("a car (sedan) in the style of <sketch>", "car_(sedan)"), ("a cat in the style of <sketch>", "cat"),
        ("a <sketch>", None)]
    assert filled.card_prompt() == "a airplane in the style of <sketch>"
    # the templates' rows, with their articles (the training prompts were "a airplane", "a apple")
    assert task().validation_rows() == [("an airplane in the style of <sketch>", "airplane"),
                                        ("an apple in the style of <sketch>", "apple")]
    assert task().prompt_for("cat", 4) == "a <sketch> of a cat" and task().prompt_for("owl", 1).startswith("a drawing of an owl")
    # an object's token: one row (two rows drew the same prompt), of the run's category where it has one
    assert task("--learnable_property", "object").validation_rows() == [("a photo of a <sketch>", None)]
    with pytest.raises(UserError, match=r"--validation_prompt 'a \{categroy\}': \{categroy\} cannot be filled in; it can hold \{category\}"):
        task("--validation_prompt", "a {categroy}")
    with pytest.raises(UserError, match="--train_data_dir images have none"):
        task("--train_data_dir", str(tmp_path), "--validation_prompt", "a {category}")


def test_validation_gives_the_pipeline_the_prompt_its_loader_expands_to_the_trained_one(tiny_models, tmp_path):
    """A multi-vector token: training reads `<sketch> <sketch>_1 <sketch>_2`; a pipeline with diffusers' loader spells
    the token out itself, so validation gives it `<sketch>` (spelt out first, every name was expanded again: the
    mosaic drew a prompt never trained)."""
    from diffusers import StableDiffusionPipeline

    from sketch2real.cli import parse_options
    from sketch2real.family import placeholder_tokens
    from sketch2real.training.textual_inversion import TextualInversionOptions, TextualInversionTask

    opts = parse_options(TextualInversionOptions, ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path),
                                                   "--shard_dir", "s", "--num_vectors", "3"])
    task = TextualInversionTask.__new__(TextualInversionTask)  # the prompts need only the options and tokens
    task.opts, task.tokens = opts, placeholder_tokens("<sketch>", 3)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd)
    pipe.load_textual_inversion(torch.zeros(3, pipe.text_encoder.config.hidden_size), token="<sketch>")
    prompt = "a cat in the style of <sketch>"
    trained = task.prompt_transform(prompt)
    assert trained == "a cat in the style of <sketch> <sketch>_1 <sketch>_2"
    assert pipe.maybe_convert_prompt(task.pipeline_prompt(pipe, prompt), pipe.tokenizer) == trained
