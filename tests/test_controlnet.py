import json
import re
import shutil

import numpy as np
import pytest
import torch

from .helpers import (
    LAUNCHERS,
    SHARP_ADAM,
    assert_agrees_within_bf16,
    check_model_card_usage,
    in_process_accelerator,
    launch,
    relative_difference,
    run_matrix_case,
    run_script,
    weights,
)


@pytest.fixture
def cn_args(tiny_models, shard_dir):
    return ["--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir, "--resolution", "64",
            "--learning_rate", "1e-3", "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none",
            "--num_heldout_samples", "8"]


def _conditioned_loss(controlnet_dir, tiny_models, shard_dir) -> float:
    from diffusers import ControlNetModel

    from sketch2real.models import load_sd_components
    from sketch2real.sketchy import sketch_condition
    from sketch2real.training.controlnet import _pairs, init_controlnet
    from sketch2real.training.diffusion import DenoisingObjective, tokenize
    from sketch2real.training.validation import heldout_denoising_loss

    c = load_sd_components(str(tiny_models.sd))
    controlnet = ControlNetModel.from_pretrained(controlnet_dir) if controlnet_dir else init_controlnet(c.denoiser, seed=0)
    sketches, photos, refs = _pairs(str(shard_dir), "train", ["cat", "apple"], 64)
    n = len(refs)
    conditioning = sketch_condition(sketches[list(range(n))])
    states = c.text_encoder(tokenize(c.tokenizer, ["a photo"]))[0]
    position = {"i": 0}

    def predict(noisy, timesteps, prompts):
        i = position["i"]
        position["i"] += len(prompts)
        s = states.expand(len(prompts), -1, -1)
        down, mid = controlnet(noisy, timesteps, s, controlnet_cond=conditioning[i : i + len(prompts)], return_dict=False)
        return c.denoiser(noisy, timesteps, s, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    with torch.no_grad():
        return heldout_denoising_loss(predict, c.vae, DenoisingObjective(c.noise_scheduler), photos[list(range(n))], ["a photo"] * n, seed=3)


def test_training_lowers_the_loss_and_the_controlnet_loads_in_diffusers(cn_args, tiny_models, shard_dir, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    out = tmp_path / "cn"
    run_script("train/controlnet.py", *cn_args, "--output_dir", out, "--max_train_steps", "30", "--train_batch_size", "4",
               "--categories", "cat", "apple", "--validation_steps", "30", "--num_validation_images", "1",
               "--validation_inference_steps", "2", "--prompt_template", "a photo")
    assert (out / "config.json").is_file() and (out / "validation" / "step-000030.png").is_file()
    assert _conditioned_loss(out, tiny_models, shard_dir) < 0.9 * _conditioned_loss(None, tiny_models, shard_dir)
    assert "heldout_loss" in json.loads((out / "metrics.json").read_text())

    controlnet = ControlNetModel.from_pretrained(out)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_models.sd, controlnet=controlnet, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    a, b = Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), "white")
    b.paste((0, 0, 0), (10, 10, 50, 50))
    kwargs = dict(height=64, width=64, num_inference_steps=3, output_type="np")
    out_a = pipe("a photo of a cat", image=a, generator=torch.Generator().manual_seed(0), **kwargs).images
    out_b = pipe("a photo of a cat", image=b, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(out_a - out_b).max() > 1e-3  # the conditioning sketch changes the image
    prompt, card = check_model_card_usage(out, shard_dir, tmp_path)  # the card's command and diffusers lines
    assert prompt == "a photo" and card["image"].size == (64, 64)
    # (the card's sketch lines: a transparent page with black strokes, inverted as it trained: checked there)


def test_resume_is_exact_with_any_number_of_loader_workers_and_two_processes_agree(cn_args, tmp_path):
    common = [*cn_args, "--max_train_steps", "4", "--categories", "cat", "--proportion_empty_prompts", "0.5"]
    run_script("train/controlnet.py", *common, "--output_dir", tmp_path / "a", "--checkpointing_steps", "2",
               "--train_batch_size", "2", "--dataloader_num_workers", "0")
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    run_script("train/controlnet.py", *common, "--output_dir", tmp_path / "b", "--checkpointing_steps", "2",
               "--train_batch_size", "2", "--resume_from_checkpoint", "latest", "--dataloader_num_workers", "2")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a and all(torch.equal(a[k], b[k]) for k in a)

    launch("train/controlnet.py", *common, "--output_dir", tmp_path / "ddp", "--train_batch_size", "1")
    from sketch2real.models import load_sd_components
    from sketch2real.training.controlnet import init_controlnet

    start = init_controlnet(load_sd_components(str(cn_args[1])).denoiser, seed=0)
    base = {f"diffusion_pytorch_model.safetensors:{k}": v for k, v in start.state_dict().items()}
    assert relative_difference(a, weights(tmp_path / "ddp"), base) < 1e-2


def test_generation_with_controlnet_is_deterministic_across_processes(cn_args, tiny_models, shard_dir, tmp_path,
                                                                       monkeypatch):
    run_script("train/controlnet.py", *cn_args, "--output_dir", tmp_path / "cn", "--max_train_steps", "2", "--categories", "cat")
    gen = ["--pretrained_model_name_or_path", tiny_models.sd, "--controlnet", tmp_path / "cn", "--shard_dir", shard_dir,
           "--split", "test", "--prompt_template", "a photo of a {category}", "--height", "64", "--width", "64",
           "--num_inference_steps", "2", "--max_per_category", "1", "--batch_size", "2"]
    run_script("infer/generate.py", *gen, "--output_dir", tmp_path / "one")
    launch("infer/generate.py", *gen, "--output_dir", tmp_path / "two")
    one = {p.name: p.read_bytes() for p in (tmp_path / "one" / "images").rglob("*.png")}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two" / "images").rglob("*.png")}
    assert len(one) == 5 and one == two
    rows = [json.loads(line) for line in (tmp_path / "one" / "index.jsonl").read_text().splitlines()]
    assert all(r["controlnet"] == str(tmp_path / "cn") and r["sample_key"] for r in rows)
    # each sketch still to draw from is read once before drawing: every item's, at every start, before (21 min a
    # rank at 75k items, repeated at each requeue)
    import sys

    from sketch2real.cli import run_main

    from .helpers import import_script

    script = import_script("infer/generate.py")
    checked = []
    monkeypatch.setattr(script, "readable_sketch", lambda sketches, i: checked.append(i) or True)
    for out, extra in ((tmp_path / "one", []), (tmp_path / "four", ["--num_images_per_prompt", "2"])):
        checked.clear()
        monkeypatch.setattr(sys, "argv", ["infer/generate.py", *map(str, gen), *extra, "--output_dir", str(out)])
        with pytest.raises(SystemExit) as stop:
            run_main(script.main)
        assert stop.value.code == 0
        assert len(checked) == (0 if out.name == "one" else 5) == len(set(checked))  # all drawn; 10 images of 5


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_bf16_matrix(launcher, cn_args, tmp_path, tmp_path_factory):
    from diffusers import ControlNetModel

    from sketch2real.models import load_sd_components
    from sketch2real.training.controlnet import init_controlnet

    common = [*cn_args, *SHARP_ADAM, "--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "2",
              "--num_validation_images", "1", "--validation_inference_steps", "2", "--num_heldout_samples", "2",
              "--num_validation_sketches", "1", "--categories", "cat"]
    out, one, one_fp32 = run_matrix_case(launcher, "cn", "train/controlnet.py", common, tmp_path, tmp_path_factory)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_loss"] == metrics["heldout_loss"] and (out / "validation" / "step-000002.png").is_file()
    assert ControlNetModel.from_pretrained(out).dtype == torch.float32  # fp32 master weights, also from DeepSpeed
    start = init_controlnet(load_sd_components(str(cn_args[1])).denoiser, seed=0)
    base = {f"diffusion_pytorch_model.safetensors:{k}": v for k, v in start.state_dict().items()}
    assert_agrees_within_bf16(weights(one), weights(out), weights(one_fp32), base)


def test_controlnet_starts_from_the_full_precision_unet(cn_args, tmp_path, monkeypatch):
    """Not from bf16-rounded weights: the frozen UNet is cast only after the ControlNet is copied from it. And
    --enable_xformers_memory_efficient_attention reaches the trained ControlNet (`from_unet` copies no attention
    processors: it trained with SDPA) as well as the frozen UNet (xformers needs CUDA: its switch is recorded here)."""
    import dataclasses

    import sketch2real.models
    from sketch2real.models import load_sd_components
    from sketch2real.training.controlnet import ControlNetOptions, ControlNetTask, init_controlnet

    opts = ControlNetOptions(pretrained_model_name_or_path=str(cn_args[1]), shard_dir=str(cn_args[3]), output_dir=str(tmp_path),
                             resolution=64, mixed_precision="bf16", categories=["cat"], num_heldout_samples=0)
    accelerator = in_process_accelerator("bf16")  # the precision in use
    task = ControlNetTask(opts, accelerator)
    assert task.c.denoiser.dtype == torch.bfloat16
    expected = init_controlnet(load_sd_components(str(cn_args[1])).denoiser, seed=0).state_dict()
    got = task.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())

    given = []
    monkeypatch.setattr(sketch2real.models, "enable_xformers", lambda model, device: given.append(type(model).__name__))
    ControlNetTask(dataclasses.replace(opts, enable_xformers_memory_efficient_attention=True), accelerator)
    assert given == ["UNet2DConditionModel", "ControlNetModel"]


@pytest.mark.parametrize("launcher", ["1", "zero2"])
def test_sdxl_controlnet_in_bf16_loads_in_the_sdxl_pipeline_and_generates_from_sketches(launcher, tiny_models, shard_dir,
                                                                                       tmp_path, tmp_path_factory):
    """The family comes from the model: the same script trains a ControlNet from an SDXL UNet (added conditioning
    passed to both), 2 DeepSpeed processes agree with 1, and infer/generate.py conditions SDXL on the sketches."""
    import json as json_lib

    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    from sketch2real.models import load_sd_components
    from sketch2real.training.controlnet import init_controlnet

    args = ["--pretrained_model_name_or_path", tiny_models.sdxl, "--shard_dir", shard_dir, "--resolution", "64",
            "--learning_rate", "0.5", "--max_train_steps", "3", *SHARP_ADAM, "--validation_steps", "3",
            "--num_validation_images", "1", "--validation_inference_steps", "2", "--num_heldout_samples", "4",
            "--checkpointing_steps", "0", "--report_to", "none", "--categories", "cat"]
    out, one, one_fp32 = run_matrix_case(launcher, "cn-sdxl", "train/controlnet.py", args, tmp_path, tmp_path_factory)
    metrics = json_lib.loads((out / "metrics.json").read_text())
    assert metrics["heldout_loss"] == metrics["heldout_loss"] and (out / "validation" / "step-000003.png").is_file()
    if launcher != "1":
        start = init_controlnet(load_sd_components(str(tiny_models.sdxl)).denoiser, seed=0)
        base = {f"diffusion_pytorch_model.safetensors:{k}": v for k, v in start.state_dict().items()}
        assert_agrees_within_bf16(weights(one), weights(out), weights(one_fp32), base)
        return
    controlnet = ControlNetModel.from_pretrained(out)
    assert controlnet.config.addition_embed_type == "text_time"  # a copy of the SDXL UNet's encoder
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_models.sdxl, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    a, b = Image.new("RGB", (64, 64), "black"), Image.new("RGB", (64, 64), "black")
    b.paste((255, 255, 255), (10, 10, 50, 50))
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="np", controlnet_conditioning_scale=50.0)
    out_a = pipe("a photo of a cat", image=a, generator=torch.Generator().manual_seed(0), **kwargs).images
    out_b = pipe("a photo of a cat", image=b, generator=torch.Generator().manual_seed(0), **kwargs).images
    # the sketch reaches the image: everything else is identical and deterministic, so any difference above float
    # rounding is the ControlNet's (3 steps move its zero convolutions little)
    assert abs(out_a - out_b).max() > 1e-6, abs(out_a - out_b).max()
    gen = tmp_path / "gen"
    run_script("infer/generate.py", "--pretrained_model_name_or_path", tiny_models.sdxl, "--controlnet", out, "--shard_dir",
               shard_dir, "--split", "test", "--categories", "cat", "--height", "64", "--width", "64",
               "--num_inference_steps", "2", "--prompt_template", "a photo of a {category}", "--output_dir", gen)
    rows = [json_lib.loads(line) for line in (gen / "index.jsonl").read_text().splitlines()]
    assert rows and all((gen / r["image"]).is_file() for r in rows)


def test_a_controlnet_of_another_model_is_refused_in_one_line_and_one_of_this_model_trains_on(cn_args, tiny_models,
                                                                                             tmp_path):
    """--controlnet_model_name_or_path (and generation's --controlnet) with an SDXL ControlNet on SD 1.x: a traceback
    at the first step, after the latent cache; now one line naming what differs. A ControlNet of the model trains on."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sketch2real.cli import UserError
    from sketch2real.generation import load_generation_pipeline

    for name, model in (("sd", tiny_models.sd), ("sdxl", tiny_models.sdxl)):
        ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(model / "unet")).save_pretrained(tmp_path / name)
    common = [*cn_args, "--categories", "cat", "--max_train_steps", "1", "--num_heldout_samples", "0"]
    proc = run_script("train/controlnet.py", *common, "--controlnet_model_name_or_path", tmp_path / "sdxl",
                      "--output_dir", tmp_path / "refused", check=False)
    assert proc.returncode == 2 and "is not a ControlNet of" in proc.stderr.strip().splitlines()[-1]
    assert "cross_attention_dim" in proc.stderr and not (tmp_path / "refused" / "latent_cache").exists()
    with pytest.raises(UserError, match="is not a ControlNet of .*addition_embed_type"):
        load_generation_pipeline(str(tiny_models.sd), torch.device("cpu"), torch.float32, controlnet=str(tmp_path / "sdxl"))
    # saved as another family's class (FLUX's): said so, before it loads as this family's class with default weights
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "config.json").write_text(json.dumps({"_class_name": "FluxControlNetModel"}))
    said = "is a FluxControlNetModel \\(a flux ControlNet\\): .* is a sd model, whose ControlNets are ControlNetModel"
    with pytest.raises(UserError, match=f"--controlnet .*{said}"):
        load_generation_pipeline(str(tiny_models.sd), torch.device("cpu"), torch.float32, controlnet=str(tmp_path / "flux"))
    # a family with no ControlNet (FLUX.2 [klein]): a traceback after the model loaded (no pipeline), and TI (no loader)
    for flag in ({"controlnet": str(tmp_path / "flux")}, {"textual_inversion": [str(tmp_path / "flux")]}):
        with pytest.raises(UserError, match=f"--{next(iter(flag))}: .* is a flux2-klein model, which takes no "):
            load_generation_pipeline(str(tiny_models.flux2_klein), torch.device("cpu"), torch.float32, **flag)
    proc = run_script("train/controlnet.py", *common, "--controlnet_model_name_or_path", tmp_path / "flux",
                      "--output_dir", tmp_path / "refused-flux", check=False)
    assert proc.returncode == 2 and re.search(said, proc.stderr.strip().splitlines()[-1]), proc.stderr[-1500:]
    run_script("train/controlnet.py", *common, "--controlnet_model_name_or_path", tmp_path / "sd",
               "--output_dir", tmp_path / "continued")
    assert (tmp_path / "continued" / "config.json").is_file()


def test_validation_takes_the_validation_prompt_and_images_per_sketch_as_diffusers_script(cn_args, tmp_path):
    """--validation_prompt and --num_validation_images were ignored by ControlNet's validation (held-out prompts, one
    image per sketch): now the prompt conditions each sketch's images (same seeds, other images) and each row holds
    that many (sketch | images | photo); --validation_image puts the user's sketch files in their place."""
    from PIL import Image

    common = [*cn_args, "--categories", "cat", "--max_train_steps", "2", "--num_heldout_samples", "1", "--resolution", "32",
              "--validation_steps", "2", "--num_validation_sketches", "1", "--validation_inference_steps", "2",
              "--learning_rate", "0.5"]  # 2 steps move the zero convolutions, the sketch embedding's last too
    run_script("train/controlnet.py", *common, "--num_validation_images", "1", "--output_dir", tmp_path / "own")
    run_script("train/controlnet.py", *common, "--num_validation_images", "2", "--validation_prompt", "a photo of a dog",
               "--output_dir", tmp_path / "asked")
    own, asked = (np.asarray(Image.open(tmp_path / name / "validation" / "step-000002.png")) for name in ("own", "asked"))
    assert own.shape[:2] == (32, 3 * 32) and asked.shape[:2] == (32, 4 * 32)
    assert np.array_equal(own[:, :32], asked[:, :32]) and np.array_equal(own[:, -32:], asked[:, -32:])  # sketch, photo
    assert not np.array_equal(own[:, 32:64], asked[:, 32:64])  # the first image's seed, another prompt

    # --validation_image (diffusers' flag): the user's sketch file in place of the held-out one, no photo beside it
    drawn = Image.new("RGB", (32, 32), "white")
    drawn.paste((0, 0, 0), (4, 14, 28, 18))  # a black stroke on white, as Sketchy draws
    drawn.save(tmp_path / "stroke.png")
    run_script("train/controlnet.py", *common, "--num_validation_images", "2", "--validation_prompt", "a photo of a dog",
               "--validation_image", tmp_path / "stroke.png", "--output_dir", tmp_path / "file")
    mosaic = np.asarray(Image.open(tmp_path / "file" / "validation" / "step-000002.png"))
    assert mosaic.shape[:2] == (32, 3 * 32) and np.array_equal(mosaic[:, :32], np.asarray(drawn))
    assert not np.array_equal(mosaic[:, 32:96], asked[:, 32:96])  # same prompt and seeds, another sketch
    proc = run_script("train/controlnet.py", *common, "--validation_image", tmp_path / "stroke.png", tmp_path / "stroke.png",
                      "--validation_prompt", "a", "b", "c", "--output_dir", tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "(got 2 images and 3 prompts)" in proc.stderr.strip().splitlines()[-1]
    (tmp_path / "empty.png").write_bytes(b"")  # unreadable: one line before the model loads, not a traceback later
    proc = run_script("train/controlnet.py", *common, "--validation_image", tmp_path / "empty.png", "--validation_prompt",
                      "a", "--output_dir", tmp_path / "unreadable", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and f"--validation_image {tmp_path / 'empty.png'}: " in last and "Loading" not in proc.stderr


def test_category_in_the_validation_prompt_is_each_held_out_sketchs_category(tmp_path):
    """--validation_prompt 'a photo of a {category}' was drawn braces and all: each row's sketch's category now fills
    it in (the prompts taken in turn, as diffusers' script); a misspelt field, or {category} with --validation_image
    (the user's sketches have no category), is refused in one line."""
    from PIL import Image

    from sketch2real.cli import UserError, parse_options
    from sketch2real.training.controlnet import ControlNetOptions, ControlNetTask
    from sketch2real.training.task import HeldOut

    Image.new("RGB", (8, 8), "white").save(tmp_path / "s.png")  # a readable sketch file (unreadable ones: refused)

    def prompts(*args: str) -> list[str]:
        opts = parse_options(ControlNetOptions, ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path),
                                                 "--shard_dir", "s", *args])
        opts.check()
        bare = ControlNetTask.__new__(ControlNetTask)  # the rows' prompts need only the options and held-out pairs
        bare.opts = opts
        bare.heldout = HeldOut(torch.zeros(3, 3, 8, 8), ["p0", "p1", "p2"], ["cat", "car_(sedan)", "apple"])
        return bare.validation_row_prompts(3)

    assert prompts("--validation_prompt", "a photo of a {category}", "a dog") == [
        "a photo of a cat", "a dog", "a photo of a apple"]
    assert prompts("--validation_prompt", "a {category}") == ["a cat", "a car (sedan)", "a apple"]
    assert prompts() == ["p0", "p1", "p2"]  # the sketches' own prompts
    assert prompts("--validation_prompt", "a dog", "--validation_image", str(tmp_path / "s.png")) == ["a dog"] * 3
    with pytest.raises(UserError, match=r"--validation_prompt 'a \{categroy\}': \{categroy\} cannot be filled in; it can hold \{category\}"):
        prompts("--validation_prompt", "a {categroy}")
    with pytest.raises(UserError, match="--validation_image images have none"):
        prompts("--validation_prompt", "a {category}", "--validation_image", str(tmp_path / "s.png"))


def test_the_conditioning_gain_is_said_missing_once_where_no_held_out_sketch_has_a_partner(cn_args, tmp_path):
    """The gain swaps in a sketch of another photo of the same category; the fixture's val split has one photo per
    category (3 sketches of it): no gain, which was left out of the logs without a word. One warning now, not one per
    validation; on the train split (several photos per category) the gain is there."""
    common = [*cn_args, "--categories", "cat", "--max_train_steps", "2", "--validation_steps", "1",
              "--num_validation_images", "0", "--num_heldout_samples", "3"]
    proc = run_script("train/controlnet.py", *common, "--output_dir", tmp_path / "val")
    assert proc.stderr.count("no conditioning gain: none of the 3 held-out sketches") == 1, proc.stderr[-2000:]
    assert "conditioning_gain" not in json.loads((tmp_path / "val" / "metrics.json").read_text())
    proc = run_script("train/controlnet.py", *common, "--validation_split", "train", "--output_dir", tmp_path / "train")
    assert "no conditioning gain" not in proc.stderr
    assert "conditioning_gain" in json.loads((tmp_path / "train" / "metrics.json").read_text())
