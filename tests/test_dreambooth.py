import dataclasses
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from .helpers import (
    LAUNCHERS,
    REPO,
    SHARP_ADAM,
    FakeHub,
    assert_agrees_within_bf16,
    check_model_card_usage,
    launch,
    pause_at_step,
    relative_difference,
    run_matrix_case,
    run_script,
    weights,
)


@pytest.fixture
def db_args(tiny_models, shard_dir):
    return [
        "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir, "--instance_category", "cat",
        "--instance_prompt", "a sks sketch of a cat", "--resolution", "64", "--learning_rate", "1e-3",
        "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none",
    ]


def _fixed_noise_loss(model_dir, tiny_models, shard_dir) -> float:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from sketch2real.models import load_sd_components
    from sketch2real.training.data import load_shard_images
    from sketch2real.training.diffusion import DenoisingObjective, tokenize
    from sketch2real.training.validation import heldout_denoising_loss

    c = load_sd_components(str(tiny_models.sd))
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    images, _ = load_shard_images(str(shard_dir), "train", "cat", "sketch", 64)
    states = c.text_encoder(tokenize(c.tokenizer, ["a sks sketch of a cat"]))[0]
    scheduler = DDPMScheduler.from_pretrained(tiny_models.sd, subfolder="scheduler")

    def predict(noisy, timesteps, prompts):
        return unet(noisy, timesteps, states.expand(len(prompts), -1, -1)).sample

    return heldout_denoising_loss(predict, c.vae, DenoisingObjective(scheduler), images, ["a sks sketch of a cat"] * len(images), seed=123)


def test_training_lowers_the_loss(db_args, tmp_path, tiny_models, shard_dir):
    out = tmp_path / "db"
    run_script("train/dreambooth.py", *db_args, "--output_dir", out, "--max_train_steps", "30", "--train_batch_size", "2")
    before = _fixed_noise_loss(tiny_models.sd, tiny_models, shard_dir)
    after = _fixed_noise_loss(out, tiny_models, shard_dir)
    assert after < 0.8 * before, (before, after)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["samples_per_second"] > 0
    # The output is a plain diffusers pipeline.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.sample_size == 8


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_resume_continues_exactly(family, db_args, tmp_path, tiny_models):
    """Killed after a checkpoint and resumed: bit-identical weights, UNet and text encoders (SDXL: both); a resume past
    a shorter --max_train_steps is one line (it was a traceback after rewriting run_config.json)."""
    import shutil

    args = [*db_args, "--pretrained_model_name_or_path", getattr(tiny_models, family), "--max_train_steps", "6",
            "--checkpointing_steps", "3", "--train_text_encoder"]
    straight = tmp_path / "straight"
    run_script("train/dreambooth.py", *args, "--output_dir", straight)
    assert (straight / "checkpoint-3").is_dir()
    # Keep only the step-3 checkpoint, as if the job had been killed after it, and resume.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    proc = run_script("train/dreambooth.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
    assert "resumed from" in proc.stderr
    parts = ["unet", "text_encoder", "text_encoder_2"] if family == "sdxl" else ["unet", "text_encoder"]
    for part in parts:
        a, b, base = weights(straight / part), weights(resumed / part), weights(getattr(tiny_models, family) / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
        assert any(not torch.equal(a[k], base[k]) for k in a), part  # it trained
    if family == "sd":
        # resubmitted once finished (a pipeline rerun after a later stage failed): nothing trains, nothing is rewritten
        before = {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()}
        proc = run_script("train/dreambooth.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
        assert "holds this run's trained model (6 steps" in proc.stdout and "resumed from" not in proc.stderr
        assert {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()} == before
        proc = run_script("train/dreambooth.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest",
                          "--logging_steps", "3")  # how the job runs: still finished
        assert "holds this run's trained model" in proc.stdout
        # an output the finished run did not write (another validation): made from the last step's checkpoint, no
        # step trained again; its metrics keep the loss the checkpoint read (they lost it: nan) and say no speed
        finished = json.loads((resumed / "metrics.json").read_text())
        proc = run_script("train/dreambooth.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest",
                          "--validation_steps", "6", "--num_validation_images", "1", "--validation_inference_steps", "1")
        assert "resumed from" in proc.stderr and (resumed / "validation" / "step-000006.png").is_file()
        redone = json.loads((resumed / "metrics.json").read_text())
        assert redone["steps_this_run"] == 0 and redone["final_loss"] == finished["final_loss"] is not None
        assert redone["samples_per_second"] is None and "no step trained here" in proc.stdout
        # resumed from a checkpoint past a shorter --max_train_steps: one line, the run's record kept
        record = (resumed / "run_config.json").read_bytes()
        proc = run_script("train/dreambooth.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest",
                          "--max_train_steps", "2", check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "is at step 6, past --max_train_steps 2" in last, proc.stderr[-2000:]
        assert "Loading weights" not in proc.stderr  # before the model loads (after loading and `prepare`, before)
        assert (resumed / "run_config.json").read_bytes() == record


def test_sigusr1_saves_a_checkpoint_and_exits_for_requeue(db_args, tmp_path):
    out = tmp_path / "preempted"
    args = [*db_args, "--output_dir", out, "--max_train_steps", "400", "--checkpointing_steps", "0"]
    marker = tmp_path / "paused"
    env = pause_at_step({**os.environ, "OMP_NUM_THREADS": "1"}, 50, marker)  # the trainer holds at step 50
    proc = subprocess.Popen([sys.executable, str(REPO / "train/dreambooth.py"), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not Path(f"{marker}.rank0").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-2000:]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not list(out.glob("*.partial"))
    step = int(checkpoints[0].name.split("-")[1])
    assert step == 60  # the first read of device values after the signal (--logging_steps 10)
    assert "preempted" in stderr
    # The requeued job continues from it.
    proc = run_script("train/dreambooth.py", *db_args, "--output_dir", out, "--max_train_steps", str(step + 2),
                      "--resume_from_checkpoint", "latest")
    assert json.loads((out / "metrics.json").read_text())["steps_this_run"] == 2
    assert "lr_scheduler.step()" not in proc.stderr  # torch's warning at the schedule's fast-forward: on purpose
    # what runs, said before the first step
    assert f"dreambooth: {db_args[1]}, steps {step} to {step + 2}, global batch 1 (1 x 1 processes x 1 accumulated), fp32" in proc.stderr


def test_caption_dropout_trains_dropped_images_on_the_empty_prompt_whatever_the_processes(db_args, tmp_path,
                                                                                            tiny_models):
    common = [*db_args, "--max_train_steps", "3"]
    runs = {name: tmp_path / name for name in ("all", "empty", "half", "half_ddp", "none")}
    run_script("train/dreambooth.py", *common, "--train_batch_size", "2", "--output_dir", runs["none"])
    run_script("train/dreambooth.py", *common, "--train_batch_size", "2", "--caption_dropout_probability", "1",
               "--output_dir", runs["all"])
    run_script("train/dreambooth.py", *common, "--train_batch_size", "2", "--instance_prompt", "", "--output_dir",
               runs["empty"])
    run_script("train/dreambooth.py", *common, "--train_batch_size", "2", "--caption_dropout_probability", "0.5",
               "--output_dir", runs["half"])
    launch("train/dreambooth.py", *common, "--train_batch_size", "1", "--caption_dropout_probability", "0.5",
           "--output_dir", runs["half_ddp"])
    unet = {name: weights(out / "unet") for name, out in runs.items()}
    # every image dropped: exactly the run whose prompt is empty
    assert all(torch.equal(unet["all"][k], unet["empty"][k]) for k in unet["all"])
    # half dropped (seeded per step and image): neither run with one prompt throughout, nor, on 2 processes, another draw
    base = weights(tiny_models.sd / "unet")
    assert min(relative_difference(unet["half"], unet[other], base) for other in ("empty", "none")) > 0.05
    assert relative_difference(unet["half"], unet["half_ddp"], base) < 1e-2


def _category_captions(path: Path, shard_dir, shift: int) -> Path:
    """A captions file giving each train sketch the prompt of the category `shift` places after its own."""
    from sketch2real.shards import ShardSamples
    from sketch2real.sketchy import category_words

    refs = ShardSamples(str(shard_dir), "train", fields=("sketch",), resolution=64).refs
    categories = sorted({r.category for r in refs})
    rows = [{"key": r.key, "prompt_id": "4", "caption": "a sks sketch of a " + category_words(
        categories[(categories.index(r.category) + shift) % len(categories)])} for r in refs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_style_over_every_category_trains_each_image_with_its_categorys_prompt(db_args, tmp_path, tiny_models,
                                                                                 shard_dir):
    """{category} in --instance_prompt over every category (the shards read through the on-disk latent store): each
    image trained with its own category's prompt. Captions that say the same (encoded with each batch, another path)
    train the same weights; captions naming other categories train others."""
    common = [*db_args, "--instance_category", "", "--instance_prompt", "a sks sketch of a {category}",
              "--max_train_steps", "3", "--train_batch_size", "4"]
    runs = {name: tmp_path / name for name in ("template", "captions", "wrong")}
    run_script("train/dreambooth.py", *common, "--output_dir", runs["template"])
    for name, shift in (("captions", 0), ("wrong", 1)):
        run_script("train/dreambooth.py", *common, "--output_dir", runs[name], "--captions",
                   _category_captions(tmp_path / f"{name}.jsonl", shard_dir, shift))
    unet = {name: weights(out / "unet") for name, out in runs.items()}
    base = weights(tiny_models.sd / "unet")
    assert relative_difference(unet["template"], unet["captions"], base) < 1e-3
    assert relative_difference(unet["template"], unet["wrong"], base) > 0.05
    from sketch2real.shards import ShardSamples

    store = json.loads((runs["template"] / "metrics.json").read_text())["latent_cache"]["stores"]["instance"]
    every = ShardSamples(str(shard_dir), "train", fields=("sketch",), resolution=64)
    assert store["images"] == len(every) and len({r.category for r in every.refs}) > 1  # all categories, in the store
    # the captions' conditionings came from the on-disk text store (one per distinct caption), not the encoders
    text = json.loads((runs["captions"] / "metrics.json").read_text())["latent_cache"]["text_store"]
    assert text["prompts"] == len({r.category for r in every.refs}) and text["blocks_encoded_here"] == 1


def test_the_text_store_gives_back_each_prompts_conditioning_bit_for_bit_and_is_reused(tmp_path):
    """bf16 conditionings (with a pooled embedding) over two blocks: each prompt's rows exactly, whatever the batch;
    a second build (a requeued job, a later run) encodes nothing."""
    from types import SimpleNamespace

    from sketch2real.family import Conditioning
    from sketch2real.training.text_store import BLOCK, TextStore

    calls = []

    def encode(prompts: list[str]) -> Conditioning:
        calls.append(len(prompts))
        seeds = torch.tensor([sum(map(ord, p)) for p in prompts], dtype=torch.float32)
        return Conditioning((seeds[:, None, None] * torch.linspace(0.1, 7.3, 12).view(1, 3, 4)).bfloat16(),
                            torch.sin(seeds)[:, None].expand(-1, 5).bfloat16())

    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, wait_for_everyone=lambda: None)
    prompts = [f"a sks sketch, caption {i}" for i in range(BLOCK + 44)]
    store = TextStore(tmp_path, prompts + prompts[:3], "model|bf16|64")  # duplicates are stored once
    store.build(accelerator, encode)
    assert store.stats["prompts"] == len(prompts) and store.stats["blocks_encoded_here"] == 2
    batch = [prompts[-1], prompts[5], prompts[-1]]
    got, expected = store(batch, torch.device("cpu")), encode(batch)
    assert got.states.dtype == torch.bfloat16 and torch.equal(got.states, expected.states)
    assert torch.equal(got.pooled, expected.pooled) and got.time_ids is None
    calls.clear()
    again = TextStore(tmp_path, list(reversed(prompts)), "model|bf16|64")
    again.build(accelerator, encode)
    assert not calls and again.stats["blocks_reused"] == 2 and torch.equal(again(batch, torch.device("cpu")).states,
                                                                           expected.states)
    assert TextStore(tmp_path, prompts, "other model|bf16|64").folder != store.folder

    # A damaged block (a file cut short, a foreign file of the wrong rows) is encoded again, never read as conditioning
    np.save(store.folder / "block-000001.0.npy", np.zeros((3, 3, 4), np.int16))
    (store.folder / "block-000000.1.npy").write_bytes((store.folder / "block-000000.1.npy").read_bytes()[:200])
    calls.clear()
    repaired = TextStore(tmp_path, prompts, "model|bf16|64")
    repaired.build(accelerator, encode)
    assert repaired.stats["blocks_encoded_here"] == 2 and sum(calls) == 1 + len(prompts)  # (1: its size measured)
    got = repaired(batch, torch.device("cpu"))
    assert torch.equal(got.states, expected.states) and torch.equal(got.pooled, expected.pooled)


def test_the_text_store_is_keyed_by_the_encoders_weights_not_the_path_as_typed(tiny_models, tmp_path, monkeypatch):
    """`--pretrained_model_name_or_path model` run from two project folders (other encoders) with one shared
    --latent_cache_dir: the second run trained on the first one's encodings."""
    import shutil

    from sketch2real.cli import parse_options
    from sketch2real.family import family_of
    from sketch2real.training.dreambooth import DreamBoothOptions, text_store_identity

    for project in ("a", "b"):
        shutil.copytree(tiny_models.sd, tmp_path / project / "model")
    encoder = tmp_path / "b" / "model" / "text_encoder" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(encoder)
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, encoder)
    identities = []
    for project in ("a", "b", "a"):
        monkeypatch.chdir(tmp_path / project)
        opts = parse_options(DreamBoothOptions, ["--pretrained_model_name_or_path", "model", "--output_dir", "out",
                                                 "--shard_dir", "s"])
        identities.append(text_store_identity(opts, family_of("model"), torch.bfloat16))
    assert identities[0] != identities[1] and identities[0] == identities[2]
    # another --resolution encodes again only where the conditioning holds it (SDXL's time ids)
    for model, differs in ((tiny_models.sd, False), (tiny_models.sdxl, True), (tiny_models.flux, False)):
        per_resolution = {text_store_identity(parse_options(DreamBoothOptions, [
            "--pretrained_model_name_or_path", str(model), "--output_dir", "out", "--shard_dir", "s", "--resolution",
            str(resolution)]), family_of(str(model)), torch.bfloat16) for resolution in (32, 64)}
        assert len(per_resolution) == (2 if differs else 1), model


def test_a_text_store_that_will_not_fit_its_disk_stops_before_encoding_in_one_line(tmp_path, monkeypatch):
    """FLUX.1's T5 states at 512 tokens are 4 MiB a caption: a whole-dataset captions run's store (~300 GiB) filled
    the disk hours into encoding. Its size is known from one prompt: refused at once where it cannot fit."""
    import shutil
    from collections import namedtuple
    from types import SimpleNamespace

    from sketch2real.cli import UserError
    from sketch2real.family import Conditioning
    from sketch2real.training.text_store import TextStore

    calls = []

    def encode(prompts: list[str]) -> Conditioning:
        calls.append(len(prompts))
        return Conditioning(torch.zeros(len(prompts), 512, 4096, dtype=torch.bfloat16),
                            torch.zeros(len(prompts), 768, dtype=torch.bfloat16))

    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, wait_for_everyone=lambda: None)
    per_prompt = 512 * 4096 * 2 + 768 * 2
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(2**40, 0, 300 * per_prompt - 1))
    store = TextStore(tmp_path, [f"caption {i}" for i in range(300)], "flux|bf16|512")
    with pytest.raises(UserError, match=r"the text store of 300 prompts \(4\.0 MiB each\) needs 1\.17 GiB in .*--latent_cache_dir"):
        store.build(accelerator, encode)
    assert calls == [1] and not list(store.folder.glob("block-*"))  # one prompt measured, nothing stored
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(2**40, 0, 300 * per_prompt))
    calls.clear()
    store.build(accelerator, encode)
    assert store.stats["blocks_encoded_here"] == 2 and sum(calls) == 301


def test_prodigy_sets_its_own_step_resumes_exactly_and_sums_its_estimate_under_zero(db_args, tmp_path):
    """--optimizer prodigy (learning rate 1.0 by default): its step-size estimate d grows from d0 as it trains; a run
    resumed from a checkpoint ends with the same LoRA, bit for bit; under ZeRO its estimate is summed over the processes."""
    import shutil

    from safetensors.torch import load_file

    at = db_args.index("--learning_rate")
    args = [*db_args[:at], *db_args[at + 2:], "--max_train_steps", "9", "--checkpointing_steps", "4", "--lora_rank", "4",
            "--optimizer", "prodigy", "--prodigy_use_bias_correction", "false"]  # the learning rate: Prodigy's default
    straight, resumed, zero2 = tmp_path / "straight", tmp_path / "resumed", tmp_path / "zero2"
    run_script("train/dreambooth.py", *args, "--train_batch_size", "2", "--output_dir", straight)
    group, end = (torch.load(straight / f"checkpoint-{step}" / "optimizer.bin", weights_only=True)["param_groups"][0]
                  for step in (4, 8))
    assert group["lr"] == 1.0 and end["d"] > group["d"] >= group["d0"] and end["d"] > 2 * group["d0"]
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    run_script("train/dreambooth.py", *args, "--train_batch_size", "2", "--output_dir", resumed,
               "--resume_from_checkpoint", "latest")
    a, b = (load_file(out / "pytorch_lora_weights.safetensors") for out in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # ZeRO: each process steps its part of the state, so the estimate is summed over them (prodigyopt does it on
    # CUDA only: here, one line)
    from types import SimpleNamespace

    from sketch2real.cli import UserError
    from sketch2real.training.loop import make_optimizer
    from sketch2real.training.options import TrainOptions

    opts = TrainOptions(optimizer="prodigy", learning_rate=1.0)
    sharded = make_optimizer([torch.nn.Parameter(torch.zeros(2))], opts, SimpleNamespace(type="cuda"), 1.0, sharded=True)
    assert sharded.defaults["fsdp_in_use"] and not make_optimizer([torch.nn.Parameter(torch.zeros(2))], opts, torch.device(
        "cpu"), 1.0).defaults["fsdp_in_use"]
    # ZeRO steps each parameter group on its own, one process or several: each group would get its own estimate
    # (--train_text_encoder's LoRA: the text encoder's group ended at 0.72 of the denoiser's on a GPU stand-in)
    # Groups of the same settings (SD 1.x text-encoder adapters) are one there: what one process computes.
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}, {"params": [torch.nn.Parameter(torch.zeros(2))],
                                                                  "weight_decay": 1e-3}]
    with pytest.raises(UserError, match="each of the 2 parameter groups"):
        make_optimizer(groups, opts, torch.device("cpu"), 1.0, zero=True)
    assert len(make_optimizer(groups, opts, torch.device("cpu"), 1.0).param_groups) == 2  # one process steps both
    alike = [{"params": [torch.nn.Parameter(torch.zeros(2))]}, {"params": [torch.nn.Parameter(torch.zeros(2))]}]
    merged = make_optimizer(alike, opts, torch.device("cpu"), 1.0, zero=True).param_groups
    assert len(merged) == 1 and len(merged[0]["params"]) == 2
    proc = launch("train/dreambooth.py", *args, "--output_dir", zero2, deepspeed_config="accelerate_configs/"
                  "deepspeed_zero2.yaml", check=False)
    assert proc.returncode != 0 and "under DeepSpeed ZeRO needs CUDA devices" in proc.stderr


def _ema_of(sequence: list[dict], decay: float) -> dict:
    """The average --use_ema keeps of a sequence of per-step weights (diffusers' EMAModel's decay schedule)."""
    average = {k: v.clone() for k, v in sequence[0].items()}
    for update, trained in enumerate(sequence[1:], start=2):
        decay_now = min(decay, update / (update + 9))
        for name in average:
            average[name] = decay_now * average[name] + (1 - decay_now) * trained[name]
    return average


def _lora_ups(folder) -> dict:
    return {k: v for k, v in weights(folder).items() if "lora.up" in k}


def test_ema_is_the_average_of_every_steps_weights_and_is_what_is_saved(db_args, tmp_path):
    """--use_ema, 1 process, full UNet: the UNet saved at --output_dir is the moving average of the trained weights
    of steps 1-4 (read from per-step checkpoints), the trained weights are in without_ema/, and each checkpoint holds
    the average so far."""
    out = tmp_path / "ema"
    run_script("train/dreambooth.py", *db_args, "--output_dir", out, "--max_train_steps", "4", "--checkpointing_steps", "1",
               "--checkpoints_total_limit", "0", "--use_ema", "--ema_decay", "0.9")
    prefix = "model.safetensors:denoiser."
    steps = [{k[len(prefix):]: v for k, v in weights(out / f"checkpoint-{s}").items() if k.startswith(prefix)}
             for s in (1, 2, 3)]
    unet = "diffusion_pytorch_model.safetensors:"
    last = {k[len(unet):]: v for k, v in weights(out / "without_ema" / "unet").items()}
    saved = {k[len(unet):]: v for k, v in weights(out / "unet").items()}
    assert steps[0].keys() == last.keys() == saved.keys()
    expected = _ema_of([*steps, last], 0.9)
    assert all(torch.allclose(saved[k], expected[k], atol=1e-7, rtol=1e-6) for k in expected)
    assert relative_difference(saved, last, steps[0]) > 0.1  # the average is not the last weights
    # without_ema/ loads alone, its frozen components stored once: the same files, not copies
    for name in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (out / "without_ema" / name).samefile(out / name)
    assert not (out / "without_ema" / "unet" / "diffusion_pytorch_model.safetensors").samefile(out / "unet" /
                                                                                          "diffusion_pytorch_model.safetensors")
    in_checkpoint = weights(out / "checkpoint-3")
    assert all(torch.allclose(in_checkpoint[f"ema.safetensors:denoiser.{k}"], v, atol=1e-7, rtol=1e-6)
               for k, v in _ema_of(steps, 0.9).items())
    # generation from checkpoint-3 (a full run's: no pipeline in it) uses the average, as a LoRA run's checkpoint does
    from sketch2real.cli import UserError
    from sketch2real.generation import load_generation_pipeline

    unet = load_generation_pipeline(str(out / "checkpoint-3"), torch.device("cpu"), torch.float32).unet.state_dict()
    assert all(torch.equal(unet[k], in_checkpoint[f"ema.safetensors:denoiser.{k}"]) for k in saved)
    # under DeepSpeed each process's file holds a partition of the average: refused in one line, not the trained weights
    sharded = tmp_path / "sharded" / "checkpoint-3"
    shutil.copytree(out / "checkpoint-3", sharded)
    (sharded / "ema.safetensors").rename(sharded / "ema-0.safetensors")
    manifest = json.loads((sharded / "manifest.json").read_text())
    manifest["files"]["ema-0.safetensors"] = manifest["files"].pop("ema.safetensors")
    (sharded / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="EMA under DeepSpeed"):
        load_generation_pipeline(str(sharded), torch.device("cpu"), torch.float32)


def test_with_ema_a_lora_checkpoint_holds_the_average_as_the_final_save(db_args, tmp_path):
    """--use_ema with LoRA: the LoRA file in checkpoint-N is the average at step N (the one the checkpoint holds for
    a resume), as the final save writes the average, not the trained weights of that step."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    out = tmp_path / "ema-lora"
    run_script("train/dreambooth.py", *db_args, "--output_dir", out, "--max_train_steps", "3", "--checkpointing_steps", "2",
               "--lora_rank", "4", "--learning_rate", "1e-2", "--use_ema", "--ema_decay", "0.5")
    folder = out / "checkpoint-2"
    saved = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in
                                             StableDiffusionPipeline.lora_state_dict(folder)[0].items()})
    state = weights(folder)
    average, trained = ({k.removeprefix(f"{file}:denoiser.").replace(".default", ""): v for k, v in state.items()
                         if k.startswith(f"{file}:denoiser.") and ".lora_" in k}
                        for file in ("ema.safetensors", "model.safetensors"))
    assert saved.keys() == average.keys() and all(torch.equal(saved[k], average[k]) for k in saved)
    assert any(not torch.equal(trained[k], average[k]) for k in average)


def test_validation_sees_the_ema_and_training_goes_on_from_the_trained_weights(tmp_path):
    from sketch2real.training.averages import EMAWeights
    from sketch2real.training.callbacks import Run, Validation

    from .helpers import in_process_accelerator

    model = torch.nn.Linear(3, 1)
    start = model.weight.detach().clone()
    ema = EMAWeights(in_process_accelerator("no"), model, None, decay=0.9)
    ema.update(1)  # the first update starts the average at the weights
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(2)
    trained = model.weight.detach().clone()

    class Task:
        def validate(self, accelerator, model, step):
            return {"weight_sum": float(model.weight.detach().sum())}

    run = Run(Task(), None, in_process_accelerator("no"), model, None, None, tmp_path, {}, None, step=2, start_step=0,
              last_checkpoint=None, averaged=ema)
    Validation()._validate(run)
    decay = 2 / 11
    assert run.logs["weight_sum"] == pytest.approx(float((decay * start + (1 - decay) * trained).sum()), rel=1e-6)
    assert torch.equal(model.weight, trained)


def test_schedule_free_validates_its_average_and_steps_on_from_its_exact_iterate(tmp_path):
    """--optimizer adamw_schedulefree: validation sees x, the weights schedulefree's own eval() gives; the step after
    it is the step of an optimizer never switched (y back bit for bit); the logged learning rate is its warm-up's."""
    import copy

    from diffusers.optimization import get_scheduler

    from sketch2real.training.averages import averaged_weights
    from sketch2real.training.callbacks import Run, Validation
    from sketch2real.training.loop import make_optimizer
    from sketch2real.training.options import TrainOptions

    from .helpers import in_process_accelerator

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    unused = torch.nn.Parameter(torch.ones(2))  # trained, but no gradient ever reaches it: it stays y
    opts = TrainOptions(pretrained_model_name_or_path="m", output_dir=str(tmp_path), optimizer="adamw_schedulefree",
                        learning_rate=0.1, lr_warmup_steps=2)
    optimizer = make_optimizer([*model.parameters(), unused], opts, torch.device("cpu"), opts.learning_rate)
    model.register_parameter("unused", unused)
    average = averaged_weights(opts, in_process_accelerator("no"), model, optimizer)
    inputs = torch.randn(4, 4, 3)

    def step(model, optimizer, i):
        model(inputs[i]).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    class Task:
        def validate(self, accelerator, model, step):
            self.seen = [p.detach().clone() for p in model.parameters()]
            return {}

    task = Task()
    run = Run(task, opts, in_process_accelerator("no"), model, optimizer, get_scheduler("constant", optimizer), tmp_path,
              {}, None, step=1, start_step=0, last_checkpoint=None, averaged=average)
    step(model, optimizer, 0)
    assert run.learning_rate() == pytest.approx(0.05)  # step 1 of a 2-step warm-up
    for i in (1, 2):
        step(model, optimizer, i)
    trained = [p.detach().clone() for p in model.parameters()]
    untouched = copy.deepcopy((model, optimizer))
    evaluated = copy.deepcopy((model, optimizer))
    evaluated[1].eval()
    Validation()._validate(run)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(task.seen, evaluated[0].parameters()))
    assert min((a - b).abs().max() for a, b in zip(task.seen[:2], trained[:2])) > 1e-3  # x is not y
    assert torch.equal(task.seen[2], trained[2])  # where no gradient reached, x = y
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), trained))
    step(model, optimizer, 3)
    step(*untouched, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), untouched[0].parameters()))
    untouched[1].eval()
    average.install()  # the end of a run: the model in memory is the one saved (x), as a sequential stage measures it
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(model.parameters(), untouched[0].parameters()))


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_schedule_free_under_zero_saves_the_one_process_average_and_resumes_exactly(zero, db_args, tmp_path):
    """ZeRO-2/3 over 2 processes: the saved LoRA is the 1-process average (each process computes x on its partition,
    ZeRO-3's too, whose optimizer groups are empty between steps); a ZeRO-2 run resumed from a checkpoint (its
    optimizer's step count, warm-up and average weights with it) saves the same LoRA, bit for bit."""
    import shutil

    args = [*db_args, "--max_train_steps", "4", "--checkpointing_steps", "2", "--lora_rank", "4", "--learning_rate",
            "1e-2", "--optimizer", "adamw_schedulefree", "--lr_warmup_steps", "3"]
    one, sharded, resumed = tmp_path / "one", tmp_path / zero, tmp_path / "resumed"
    run_script("train/dreambooth.py", *args, "--train_batch_size", "2", "--output_dir", one)
    config = f"accelerate_configs/deepspeed_{zero}.yaml"
    launch("train/dreambooth.py", *args, "--output_dir", sharded, deepspeed_config=config)
    a, b = _lora_ups(one), _lora_ups(sharded)
    assert relative_difference(a, b, {k: torch.zeros_like(v) for k, v in a.items()}) < 1e-3
    if zero == "zero3":
        return
    resumed.mkdir()
    shutil.copytree(sharded / "checkpoint-2", resumed / "checkpoint-2")
    launch("train/dreambooth.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest",
           deepspeed_config=config)
    assert json.loads((resumed / "metrics.json").read_text())["steps_this_run"] == 2  # DeepSpeed's checkpoint resumed
    c = _lora_ups(resumed)
    assert b.keys() == c.keys() and all(torch.equal(b[k], c[k]) for k in b)


def test_optimizers_that_count_steps_per_call_refuse_a_zero3_split_and_schedule_free_refuses_a_schedule(tmp_path):
    """ZeRO-3 steps its torch optimizer once per sub-group: Prodigy's and schedule-free's step counts would advance
    once per sub-group. Schedule-free takes no decaying schedule and no EMA on top of its own average."""
    from types import SimpleNamespace

    from schedulefree import AdamWScheduleFree

    from sketch2real.cli import UserError
    from sketch2real.training.loop import check_optimizer_kept, check_step_counting, make_optimizer
    from sketch2real.training.options import TrainOptions

    base = dict(pretrained_model_name_or_path="m", output_dir=str(tmp_path))
    for name, lr in (("adamw_schedulefree", 1e-3), ("prodigy", 1.0), ("adamw", 1e-3)):
        opts = TrainOptions(**base, optimizer=name, learning_rate=lr)
        inner = make_optimizer([torch.nn.Parameter(torch.zeros(2))], opts, torch.device("cpu"), lr)
        for sub_groups in (1, 3):
            wrapped = SimpleNamespace(optimizer=SimpleNamespace(  # accelerate's wrapper over DeepSpeed's ZeRO-3
                sub_group_to_group_id=dict.fromkeys(range(sub_groups), 0), optimizer=inner))
            if sub_groups > 1 and name != "adamw":
                with pytest.raises(UserError, match="once per sub-group"):
                    check_step_counting(wrapped)
            else:
                check_step_counting(wrapped)
    # DeepSpeed's optimizer offload: accelerate swaps the optimizer for DeepSpeed's CPU Adam (AdamW only for AdamW)
    offloaded = SimpleNamespace(optimizer=SimpleNamespace(optimizer=type("DeepSpeedCPUAdam", (), {})()))
    check_optimizer_kept(TrainOptions(**base), torch.optim.AdamW, offloaded)
    with pytest.raises(UserError, match="replaced --optimizer adamw_schedulefree"):
        check_optimizer_kept(TrainOptions(**base, optimizer="adamw_schedulefree"), AdamWScheduleFree, offloaded)
    for extra, message in (({"lr_scheduler": "cosine"}, "replaces the learning-rate schedule"),
                           ({"use_ema": True}, "drop --use_ema"), ({"use_8bit_adam": True}, "is an AdamW")):
        with pytest.raises(UserError, match=message):
            TrainOptions(**base, optimizer="adamw_schedulefree", **extra).check()
    TrainOptions(**base, optimizer="adamw_schedulefree", lr_scheduler="constant_with_warmup").check()


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_ema_under_zero_is_sharded_matches_one_process_and_resumes_exactly(zero, db_args, tmp_path):
    """ZeRO-2/3 over 2 processes: each process averages its partition of the fp32 masters (the checkpoint holds two
    shares, each smaller than the whole); validation and the saved LoRA see the same average as 1 process; ZeRO-2
    resumed from a checkpoint saves the same LoRA, bit for bit."""
    from safetensors.torch import load_file

    plain_args = [*db_args, "--max_train_steps", "4", "--checkpointing_steps", "2", "--lora_rank", "4", "--learning_rate",
                  "1e-2", "--validation_steps", "4", "--num_heldout_samples", "2", "--num_validation_images", "0"]
    args = [*plain_args, "--use_ema", "--ema_decay", "0.9"]
    one, sharded = tmp_path / "one", tmp_path / zero
    run_script("train/dreambooth.py", *args, "--train_batch_size", "2", "--output_dir", one)
    config = f"accelerate_configs/deepspeed_{zero}.yaml"
    launch("train/dreambooth.py", *args, "--output_dir", sharded, deepspeed_config=config)
    whole = sum(t.numel() for t in load_file(one / "checkpoint-2" / "ema.safetensors").values())
    shares = [sum(t.numel() for t in load_file(sharded / "checkpoint-2" / f"ema-{r}.safetensors").values()) for r in (0, 1)]
    assert all(share < 0.75 * whole for share in shares) and sum(shares) >= whole, (shares, whole)
    a, b = _lora_ups(one), _lora_ups(sharded)
    assert relative_difference(a, b, {k: torch.zeros_like(v) for k, v in a.items()}) < 1e-3
    assert relative_difference(a, _lora_ups(one / "without_ema"), {k: torch.zeros_like(v) for k, v in a.items()}) > 0.05
    plain = tmp_path / "plain"  # validation without the average: the held-out loss it would log
    run_script("train/dreambooth.py", *plain_args, "--train_batch_size", "2", "--output_dir", plain)
    losses = [json.loads((run / "metrics.json").read_text())["heldout_loss"] for run in (one, sharded, plain)]
    assert abs(losses[0] - losses[1]) < 0.1 * abs(losses[0] - losses[2]), losses
    if zero == "zero2":
        import shutil

        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copytree(sharded / "checkpoint-2", resumed / "checkpoint-2")
        launch("train/dreambooth.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest",
               deepspeed_config=config)
        assert json.loads((resumed / "metrics.json").read_text())["steps_this_run"] == 2  # it resumed, not restarted
        c = _lora_ups(resumed)
        assert b.keys() == c.keys() and all(torch.equal(b[k], c[k]) for k in b)


def test_two_process_ddp_matches_one_process(db_args, tmp_path, tiny_models):
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("train/dreambooth.py", *db_args, "--output_dir", one, "--max_train_steps", "4", "--train_batch_size", "2")
    proc = launch("train/dreambooth.py", *db_args, "--output_dir", two, "--max_train_steps", "4", "--train_batch_size", "1")
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["num_processes"] == 2, proc.stderr[-2000:]
    # each process's peak, and the highest as the run's (rank 0's alone before)
    peaks = metrics["peak_memory_mb_per_process"]
    assert len(peaks) == 2 and all(p > 0 for p in peaks) and metrics["peak_memory_mb"] == max(peaks)
    base = weights(tiny_models.sd / "unet")
    assert relative_difference(weights(one / "unet"), weights(two / "unet"), base) < 1e-2


def test_deepspeed_zero2_trains_text_encoder_and_saves_a_pipeline(db_args, tmp_path, tiny_models):
    out = tmp_path / "ds"
    launch("train/dreambooth.py", *db_args, "--output_dir", out, "--max_train_steps", "3", "--train_text_encoder",
           "--checkpointing_steps", "2", deepspeed_config="accelerate_configs/deepspeed_zero2.yaml")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    trained = pipe.text_encoder.state_dict()
    base = StableDiffusionPipeline.from_pretrained(tiny_models.sd).text_encoder.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["distributed_type"] == "DEEPSPEED"
    assert (out / "checkpoint-2" / "pytorch_model").is_dir()  # DeepSpeed's own sharded checkpoint


def _base_row_norms(model, magnitudes: dict, dtype: torch.dtype = torch.float32) -> dict:
    """What each DoRA magnitude (`weights()` key of a LoRA file) starts from: its base weight's row norms (the weight
    in `dtype`, as the run holds it)."""
    bases, norms = {}, {}
    for key in magnitudes:
        component, name = key.split(":")[1].split(".", 1)
        if component not in bases:  # transformers saves a CLIP encoder's weights without its `text_model.`
            bases[component] = {k.split(":")[1].removeprefix("text_model."): v
                                for k, v in weights(Path(model) / component).items()}
        layer = name.removesuffix(".weight").removesuffix(".lora_magnitude_vector").removeprefix("text_model.")
        norms[key] = bases[component][f"{layer}.weight"].to(dtype).norm(dim=1).float()
    return norms


def _unet_output(unet) -> torch.Tensor:
    """A UNet's prediction for fixed random inputs (tiny SD: 4 latent channels, 32-d text states)."""
    generator = torch.Generator().manual_seed(0)
    latents, states = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), states).sample


def _unet_with_saved_adapters(base, folder, target_modules=("to_k", "to_q", "to_v", "to_out.0"), **lora) -> torch.nn.Module:
    """The base UNet with the adapters of a LoRA folder loaded by peft directly, configured as trained (`lora`)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, set_peft_model_state_dict

    saved = StableDiffusionPipeline.lora_state_dict(folder)[0]
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.add_adapter(LoraConfig(target_modules=list(target_modules), **lora))
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(
        {k[len("unet."):]: v for k, v in saved.items() if k.startswith("unet.")}), adapter_name="default")
    assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys
    return unet


def test_a_full_save_from_an_fp16_variant_with_another_vae_holds_that_vae_in_fp32(db_args, tmp_path, tiny_models):
    """`--variant fp16 --pretrained_vae_model_name_or_path VAE`: the saved pipeline holds the VAE the run validated
    with (not the base's), every component in fp32 (an fp16 text encoder beside the fp32 UNet stops plain diffusers
    at the first prompt), and plain diffusers generates from it."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    base = tmp_path / "base"
    shutil.copytree(tiny_models.sd, base)
    for name, module in StableDiffusionPipeline.from_pretrained(base).components.items():
        if isinstance(module, torch.nn.Module):
            module.to(torch.float16).save_pretrained(base / name, variant="fp16")
    vae = AutoencoderKL.from_pretrained(tiny_models.sd, subfolder="vae")
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.mul_(1.5)
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "db"
    run_script("train/dreambooth.py", *db_args, "--output_dir", out, "--max_train_steps", "1",
               "--pretrained_model_name_or_path", base, "--variant", "fp16",
               "--pretrained_vae_model_name_or_path", tmp_path / "vae")
    saved = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert {name: module.dtype for name, module in saved.components.items() if isinstance(module, torch.nn.Module)} == \
        dict.fromkeys(("unet", "text_encoder", "vae"), torch.float32)
    custom = vae.state_dict()
    assert all(torch.equal(saved.vae.state_dict()[k], custom[k]) for k in custom)
    saved(prompt="a cat", num_inference_steps=1, height=64, width=64, output_type="np")


@pytest.mark.parametrize("layers", [None, "attn2.to_k,ff.net.2,proj_in"])
def test_lora_with_alpha_not_rank_reloads_identically_in_plain_diffusers_and_generation(layers, db_args, tmp_path,
                                                                                         tiny_models):
    """alpha 16 at rank 4: plain diffusers' load_lora_weights and infer/generate.py's loader give the UNet the trainer
    had (base + adapters at alpha/rank = 4); without the saved metadata diffusers reloads alpha = rank. The kohya/ComfyUI
    file (--lora_format comfyui), read back by diffusers' kohya converter, gives the same UNet. Also with --lora_layers
    adapting attention and other modules (a file of mixed names lost its attention adapters in diffusers' loader)."""
    from diffusers import StableDiffusionPipeline

    from sketch2real.generation import load_generation_pipeline

    out = tmp_path / "lora"
    targets = {"target_modules": layers.split(",")} if layers else {}
    run_script("train/dreambooth.py", *db_args, "--output_dir", out, "--max_train_steps", "10", "--lora_rank", "4",
               "--lora_alpha", "2.5", "--learning_rate", "1e-2", "--lora_format", "comfyui",  # kohya's alphas may be fractional
               *(["--lora_layers", layers] if layers else []))
    assert not (out / "unet").exists()
    saved = StableDiffusionPipeline.lora_state_dict(out)[0]
    expected = _unet_output(_unet_with_saved_adapters(tiny_models.sd, out, r=4, lora_alpha=2.5, **targets))
    base = StableDiffusionPipeline.from_pretrained(tiny_models.sd).unet
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd)
    pipe.load_lora_weights(out)
    assert pipe.unet.peft_config["default_0"].lora_alpha == 2.5 and pipe.unet.peft_config["default_0"].r == 4
    # the metadata holds what the adapters are, in fields an older peft's LoraConfig takes too (a newer peft's whole
    # config named fields 0.19/0.20 refuse: a TypeError on load), and not the machine's path to the base model
    from safetensors import safe_open

    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as f:
        metadata = {k.removeprefix("unet."): v for k, v in json.loads(f.metadata()["lora_adapter_metadata"]).items()}
    assert {"r", "lora_alpha", "target_modules", "use_dora"} <= metadata.keys()
    assert not metadata.keys() & {"kasa_config", "base_model_name_or_path", "peft_version", "runtime_config"}, metadata
    assert (expected - _unet_output(base)).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(_unet_output(pipe.unet), expected, rtol=1e-5, atol=1e-5)
    generation = load_generation_pipeline(str(out), torch.device("cpu"), torch.float32)  # fused, as generate/FID use it
    torch.testing.assert_close(_unet_output(generation.unet), expected, rtol=1e-5, atol=1e-5)

    comfyui = out / "pytorch_lora_weights_comfyui.safetensors"
    with safe_open(comfyui, "pt") as f:
        keys = set(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    adapters = sum(1 for k in saved if "lora.down" in k or "lora_A" in k)
    assert alphas == {2.5} and len(keys) == 3 * adapters  # down, up and alpha of every adapter
    kohya = StableDiffusionPipeline.from_pretrained(tiny_models.sd)
    kohya.load_lora_weights(out, weight_name=comfyui.name)  # diffusers' converter from kohya's names
    torch.testing.assert_close(_unet_output(kohya.unet), expected, rtol=1e-5, atol=1e-5)


def test_dora_reloads_as_dora_in_plain_diffusers_and_generation(db_args, tmp_path, tiny_models, shard_dir):
    """--use_dora: the file holds each adapted weight's learned magnitude, and plain diffusers (and generation's fused
    loader) rebuild the trained UNet from it: the same output as peft's DoRA with those weights; with the text
    encoder's DoRA magnitudes too."""
    from diffusers import StableDiffusionPipeline

    from sketch2real.generation import load_generation_pipeline

    out = tmp_path / "dora"
    run_script("train/dreambooth.py", *db_args, "--output_dir", out, "--max_train_steps", "6", "--lora_rank", "4",
               "--lora_alpha", "8", "--use_dora", "--learning_rate", "1e-2", "--validation_steps", "6",
               "--num_validation_images", "1", "--validation_inference_steps", "2", "--train_text_encoder",
               "--text_encoder_lr", "1e-2", "--validation_split", "test")  # two photos of cat: a held-out interval
    saved = StableDiffusionPipeline.lora_state_dict(out)[0]
    assert any("lora_magnitude_vector" in k for k in saved)
    expected = _unet_output(_unet_with_saved_adapters(tiny_models.sd, out, r=4, lora_alpha=8, use_dora=True))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd)
    pipe.load_lora_weights(out)
    assert pipe.unet.peft_config["default_0"].use_dora
    # the text encoder's trained magnitudes, not its base rows' norms (transformers' loader dropped peft's names)
    magnitudes = {name: m.lora_magnitude_vector["default_0"].weight for name, m in pipe.text_encoder.named_modules()
                  if hasattr(m, "lora_magnitude_vector") and "default_0" in m.lora_magnitude_vector}
    assert len(magnitudes) == sum(1 for k in saved if k.startswith("text_encoder.") and "lora_magnitude_vector" in k) > 0
    for name, magnitude in magnitudes.items():
        trained = next(v for k, v in saved.items() if k.startswith("text_encoder.")  # the file says text_model.<name>
                       and k.removesuffix(".weight").endswith(f".{name}.lora_magnitude_vector"))
        base_norms = pipe.text_encoder.get_submodule(name).base_layer.weight.norm(dim=1)
        assert torch.equal(magnitude.detach(), trained) and not torch.allclose(trained, base_norms, atol=1e-4), name
    torch.testing.assert_close(_unet_output(pipe.unet), expected, rtol=1e-5, atol=1e-5)
    generation = load_generation_pipeline(str(out), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(_unet_output(generation.unet), expected, rtol=1e-5, atol=1e-5)
    _assert_model_card(out)
    prompt, card = check_model_card_usage(out, shard_dir, tmp_path)  # the card's command and diffusers lines
    # the run's run_config.json is a --config that gives the same run (it held a value that is no option)
    import dataclasses

    from sketch2real.cli import parse_options
    from sketch2real.training.dreambooth import DreamBoothOptions

    rerun = parse_options(DreamBoothOptions, ["--config", str(out / "run_config.json")])
    assert dataclasses.asdict(rerun) == {k: v for k, v in json.loads((out / "run_config.json").read_text()).items()}
    assert prompt == "a sks sketch of a cat" and card["image"].size == (64, 64)
    # continued without --use_dora: the line says it is a DoRA (it said only "does not fit", 0 adapters missing)
    proc = run_script("train/dreambooth.py", *db_args, "--output_dir", tmp_path / "plain", "--lora_rank", "4",
                      "--lora_alpha", "8", "--train_text_encoder", "--initial_lora", out, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        "it is a DoRA (magnitude vectors): give --use_dora"), proc.stderr[-2000:]


@pytest.mark.parametrize("rank", [2, 4])  # the tiny UNet's factors: rank 2 stores w2 as a product, rank 4 both whole
def test_a_lokr_file_applied_as_comfyui_applies_it_gives_the_peft_models_output(rank, tiny_models, tmp_path):
    """The LoKr file, merged by ComfyUI's rule (alpha / rank only where a factor is a product), gives the UNet that
    peft's LoKr adapters give (alpha != rank: a scale lost or doubled shows)."""
    from diffusers import UNet2DConditionModel
    from peft import LoKrConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from sketch2real.lokr import merge_lokr, write_lokr

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    adapted = UNet2DConditionModel.from_pretrained(tiny_models.sd, subfolder="unet")
    adapted.add_adapter(LoKrConfig(r=rank, alpha=3, target_modules=targets))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lokr_" in name:
                p.copy_(0.3 * torch.randn_like(p))  # every factor non-zero: the update is all there is to compare
    file = write_lokr(tmp_path, get_peft_model_state_dict(adapted), 3, rank, targets)
    saved = load_file(file)
    assert any(k.endswith(".lokr_w2_a") for k in saved) == (rank == 2) and all(k.startswith("lora_unet_") for k in saved)
    merged = UNet2DConditionModel.from_pretrained(tiny_models.sd, subfolder="unet")
    assert merge_lokr(merged, file) == sum(1 for n, _ in merged.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0")))
    base = _unet_output(UNet2DConditionModel.from_pretrained(tiny_models.sd, subfolder="unet"))
    expected, got = _unet_output(adapted), _unet_output(merged)
    assert (expected - base).abs().max() > 0.05 and torch.allclose(got, expected, atol=1e-5)


def test_lokr_trains_writes_its_file_and_generation_merges_it(db_args, tmp_path, tiny_models):
    from sketch2real.generation import load_generation_pipeline

    out = tmp_path / "lokr"
    run_script("train/dreambooth.py", *db_args, "--output_dir", out, "--max_train_steps", "3", "--lora_rank", "4",
               "--lora_type", "lokr", "--lora_alpha", "8")
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert "lokr" in (out / "README.md").read_text().split("---")[1]  # the card's tags
    pipe = load_generation_pipeline(str(out), torch.device("cpu"), torch.float32)
    base = load_generation_pipeline(str(tiny_models.sd), torch.device("cpu"), torch.float32)
    changed = [n for n, p in pipe.unet.named_parameters() if not torch.equal(p, base.unet.state_dict()[n])]
    assert changed and all(n.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for n in changed), changed[:4]
    proc = run_script("train/dreambooth.py", *db_args, "--output_dir", tmp_path / "bad", "--lora_rank", "4", "--lora_type",
                      "lokr", "--use_dora", check=False)
    assert proc.returncode == 2 and "--lora_type lokr: not with --use_dora" in proc.stderr


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_pivotal_tuning_trains_new_tokens_with_the_lora_and_generation_loads_both(family, tiny_models, shard_dir,
                                                                                  tmp_path):
    """--train_text_encoder_ti: the tokens behind TOK learn rows in every embedding encoder (SDXL: both) while the LoRA
    trains; learned_embeds.safetensors beside the LoRA, and generation loads both from the one folder."""
    from safetensors.torch import load_file

    from sketch2real.generation import load_generation_pipeline

    model = getattr(tiny_models, family)
    out = tmp_path / "pivotal"
    run_script("train/dreambooth.py", "--pretrained_model_name_or_path", model, "--shard_dir", shard_dir,
               "--instance_category", "cat", "--instance_prompt", "a TOK sketch of a cat", "--resolution", "64",
               "--learning_rate", "1e-2", "--report_to", "none", "--checkpointing_steps", "0", "--max_train_steps", "4",
               "--lora_rank", "4", "--train_text_encoder_ti", "--initializer_concept", "sketch", "--validation_steps", "4",
               "--num_validation_images", "1", "--validation_inference_steps", "2", "--output_dir", out)
    rows = load_file(out / "learned_embeds.safetensors")
    encoders = {"sd": [("text_encoder", "tokenizer", "<s0>")], "flux": [("text_encoder", "tokenizer", "clip_l")],
                "sdxl": [("text_encoder", "tokenizer", "clip_l"), ("text_encoder_2", "tokenizer_2", "clip_g")]}[family]
    assert set(rows) == {key for _, _, key in encoders}  # FLUX.1: CLIP-L's rows; its T5 reads the tokens' spelling
    pipe = load_generation_pipeline(str(out), torch.device("cpu"), torch.float32)
    base = load_generation_pipeline(str(model), torch.device("cpu"), torch.float32)
    for encoder, tokenizer, key in encoders:
        saved = rows[key]
        ids = getattr(pipe, tokenizer).convert_tokens_to_ids(["<s0>", "<s0>_1"])
        loaded = getattr(pipe, encoder).get_input_embeddings().weight[ids]
        assert saved.shape[0] == 2 and torch.equal(loaded, saved), encoder
        sketch = getattr(base, tokenizer).convert_tokens_to_ids(getattr(base, tokenizer).tokenize("sketch"))[0]
        start = getattr(base, encoder).get_input_embeddings().weight[sketch]  # where both rows started
        assert (saved - start).abs().amax(dim=1).min() > 1e-3, encoder  # each row trained
    denoiser = "transformer" if family == "flux" else "unet"
    unet = {k.replace(".base_layer", ""): v for k, v in getattr(pipe, denoiser).state_dict().items() if "lora_" not in k}
    base_unet = getattr(base, denoiser).state_dict()
    assert unet.keys() == base_unet.keys() and any(not torch.equal(unet[k], base_unet[k]) for k in base_unet)  # fused
    if family != "flux":  # the card's lines load the tokens and prompt them by name (50 FLUX steps: too slow here)
        prompt, card = check_model_card_usage(out, shard_dir, tmp_path)
        assert prompt == "a <s0> sketch of a cat" and "load_textual_inversion" in (out / "README.md").read_text()
        assert "sketch2real" not in (out / "README.md").read_text().split("```python", 1)[1]  # plain diffusers
        for encoder, tokenizer, key in encoders:  # the card's pipeline holds the trained rows
            ids = getattr(card["pipe"], tokenizer).convert_tokens_to_ids(["<s0>", "<s0>_1"])
            assert torch.equal(getattr(card["pipe"], encoder).get_input_embeddings().weight[ids], rows[key]), encoder
    if family != "flux":  # --initial_lora (each sequential stage) continues the tokens' rows too: they started afresh
        again = ["--pretrained_model_name_or_path", model, "--shard_dir", shard_dir, "--instance_category", "cat",
                 "--instance_prompt", "a TOK sketch of a cat", "--resolution", "64", "--report_to", "none",
                 "--checkpointing_steps", "0", "--validation_steps", "0", "--max_train_steps", "1", "--lora_rank", "4",
                 "--train_text_encoder_ti", "--initializer_concept", "sketch", "--initial_lora", out]
        run_script("train/dreambooth.py", *again, "--learning_rate", "1e-30", "--output_dir", tmp_path / "continued")
        continued = load_file(tmp_path / "continued" / "learned_embeds.safetensors")
        assert all(torch.allclose(continued[key], rows[key], atol=1e-6) for _, _, key in encoders)
        if family == "sd":
            # the rows at --text_encoder_lr (diffusers' advanced scripts': 5e-6), the LoRA at --learning_rate
            apart = tmp_path / "apart"
            run_script("train/dreambooth.py", *again, "--learning_rate", "1e-2", "--text_encoder_lr", "1e-30",
                       "--output_dir", apart)
            assert all(torch.allclose(load_file(apart / "learned_embeds.safetensors")[key], rows[key], atol=1e-6)
                       for _, _, key in encoders)
            lora, moved = (load_file(d / "pytorch_lora_weights.safetensors") for d in (out, apart))
            assert any(not torch.allclose(lora[k], moved[k]) for k in lora)
            proc = run_script("train/dreambooth.py", *again, "--num_new_tokens_per_abstraction", "3", "--output_dir",
                              tmp_path / "three", check=False)
            assert proc.returncode == 2 and "its learned tokens (learned_embeds.safetensors: 2 x" in proc.stderr
            # captions without TOK replace the prompt that has it: the new rows never trained, silently
            proc = run_script("train/dreambooth.py", *again, "--captions", _category_captions(tmp_path / "c.jsonl", shard_dir, 0),
                              "--output_dir", tmp_path / "captions", check=False)
            assert proc.returncode == 2 and "no prompt of the instance images has --token_abstraction 'TOK'" in proc.stderr
    bad = run_script("train/dreambooth.py", "--pretrained_model_name_or_path", model, "--shard_dir", shard_dir,
                     "--instance_prompt", "a sks sketch", "--lora_rank", "4", "--train_text_encoder_ti", "--output_dir",
                     tmp_path / "bad", check=False)
    assert bad.returncode == 2 and "does not contain --token_abstraction 'TOK'" in bad.stderr


def _assert_model_card(out: Path) -> None:
    """The run's README.md: hub metadata, its data and non-default settings, metrics.json's held-out loss with its
    interval, the last mosaic."""
    import re

    from huggingface_hub import ModelCard

    card = (out / "README.md").read_text()
    data = ModelCard.load(out / "README.md").data
    assert {"lora", "dora", "dreambooth"} <= set(data.tags) and data.library_name == "diffusers"
    metrics = json.loads((out / "metrics.json").read_text())
    low, high = metrics["heldout_loss_ci95"]
    assert low <= metrics["heldout_loss"] <= high
    assert f"| heldout_loss | {metrics['heldout_loss']:.4g} | [{low:.4g}, {high:.4g}] |" in card
    assert "| lora_rank | 4 |" in card and "| use_dora | True |" in card and "| instance_category | `cat` |" in card
    assert "| seed |" not in card  # at its default
    assert "a global batch of 1 (1 per process x 1 accumulated) at learning rate 0.01 (adamw)" in card
    mosaic = re.search(r"!\[validation images\]\((.+)\)", card).group(1)
    assert (out / mosaic).is_file() and mosaic == "validation/step-000006.png"


def test_class_images_of_a_model_trained_again_in_place_are_another_model_s(tmp_path):
    """A sequential stage's model retrained in place (a rerun at another learning rate) kept its path, and the class
    folder its images drew was reused as its prior: the folder records what the weight files hold too."""
    from sketch2real.cli import parse_options
    from sketch2real.io import write_json
    from sketch2real.training.dreambooth import CLASS_CONFIG, DreamBoothOptions, class_image_settings, class_images_problem

    weights_file = tmp_path / "stage-01-cat" / "unet" / "diffusion_pytorch_model.safetensors"
    weights_file.parent.mkdir(parents=True)
    weights_file.write_bytes(b"a" * 4096)
    opts = parse_options(DreamBoothOptions, [
        "--pretrained_model_name_or_path", str(tmp_path / "stage-01-cat"), "--output_dir", str(tmp_path / "out"),
        "--shard_dir", "s", "--instance_category", "cat", "--with_prior_preservation", "--class_prompt", "a cat",
        "--class_data_dir", str(tmp_path / "classes")])
    (tmp_path / "classes").mkdir()
    write_json(tmp_path / "classes" / CLASS_CONFIG, class_image_settings(opts))
    assert class_images_problem(tmp_path / "classes", class_image_settings(opts)) == ""
    weights_file.write_bytes(b"b" * 4096)  # trained again: the same size, other weights
    assert "model_weights" in class_images_problem(tmp_path / "classes", class_image_settings(opts))
    # a hub id by its id and revision alone: its cached snapshot is absent before the job downloads it, and gains
    # files when another job downloads another variant (the requeue of the same job was refused)
    hub = dataclasses.replace(opts, pretrained_model_name_or_path="some-org/some-model")
    assert class_image_settings(hub)["model_weights"] == ""


def test_prior_preservation_generates_class_images_once(db_args, tmp_path):
    class_dir = tmp_path / "class"
    args = [*db_args, "--max_train_steps", "2", "--with_prior_preservation", "--class_prompt", "a sketch of a cat",
            "--class_data_dir", class_dir, "--num_class_images", "3", "--class_inference_steps", "2"]
    run_script("train/dreambooth.py", *args, "--output_dir", tmp_path / "a")
    images = sorted(class_dir.glob("*.png"))
    assert [p.name for p in images] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    mtimes = [p.stat().st_mtime_ns for p in images]
    run_script("train/dreambooth.py", *args, "--output_dir", tmp_path / "b")
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))] == mtimes
    # another class in the same folder (a dog run beside the cat run) took the cat images as its prior
    at = args.index("--class_prompt")
    proc = run_script("train/dreambooth.py", *args[:at], "--class_prompt", "a sketch of a dog", *args[at + 2:],
                      "--output_dir", tmp_path / "c", check=False)
    assert proc.returncode == 2 and "holds class images made with other settings (class_prompt: 'a sketch of a cat' there, " \
        "'a sketch of a dog' now)" in proc.stderr.strip().splitlines()[-1]
    # another model with the same prompt and size (SD 1.5 then 2.1-base; here a copy elsewhere) drew other priors
    at = args.index("--pretrained_model_name_or_path")
    other = shutil.copytree(args[at + 1], tmp_path / "other-model")
    proc = run_script("train/dreambooth.py", *args[:at + 1], other, *args[at + 2:], "--output_dir", tmp_path / "d", check=False)
    assert proc.returncode == 2 and f"model: '{Path(args[at + 1]).resolve()}' there, '{other}' now" in proc.stderr.strip().splitlines()[-1]


def test_sdxl_class_images_are_drawn_with_the_conditioning_their_rows_train_with(tiny_models, shard_dir, tmp_path):
    """Class rows train with SDXL's 256 px source size (Sketchy's): the class images were drawn at the pipeline's
    own (R, R), and the prior loss taught that a 256 px source looks like the base model's sharp R px output."""
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from sketch2real.training.diffusion import derive_seed

    classes, prompt = tmp_path / "classes", "a sketch of a cat"
    run_script("train/dreambooth.py", "--pretrained_model_name_or_path", tiny_models.sdxl, "--shard_dir", shard_dir,
               "--instance_category", "cat", "--instance_prompt", "a sks sketch of a cat", "--resolution", "64",
               "--max_train_steps", "1", "--with_prior_preservation", "--class_prompt", prompt, "--num_class_images", "1",
               "--class_inference_steps", "2", "--class_data_dir", classes, "--validation_steps", "0",
               "--checkpointing_steps", "0", "--report_to", "none", "--mixed_precision", "no", "--output_dir",
               tmp_path / "out")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
    pipe.set_progress_bar_config(disable=True)

    def draw(**conditioning) -> np.ndarray:
        generator = torch.Generator().manual_seed(derive_seed(0, "class", prompt, 0))
        return np.asarray(pipe(prompt=[prompt], height=64, width=64, num_inference_steps=2, generator=[generator],
                               **conditioning).images[0])

    saved = np.asarray(Image.open(classes / "class-00000.png"))
    assert np.array_equal(saved, draw(original_size=(256, 256), crops_coords_top_left=(0, 0)))
    assert not np.array_equal(saved, draw())

def test_prior_preservation_is_one_denoiser_call_weighing_each_part_as_its_own_loss():
    """Instance and class rows go through the denoiser together (one call: half the kernel launches of a step), and the
    loss is the instance loss plus --prior_loss_weight times the class loss, each row with its own prompt and timestep
    (Min-SNR weights follow the timesteps)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from sketch2real.family import Conditioning
    from sketch2real.training.diffusion import DenoisingObjective
    from sketch2real.training.dreambooth import DreamBoothTask
    from sketch2real.training.stream import NoisyBatch
    from sketch2real.training.task import DiffusionTask

    g = torch.Generator().manual_seed(0)
    rows = lambda n: NoisyBatch(list(range(n)), torch.randn(n, 4, 8, 8, generator=g),  # noqa: E731
                                torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
                                torch.randint(0, 2048, (n, 6), generator=g).float())  # a folder's images' own sizes
    instance, klass = rows(3), rows(2)
    prompts = {"instance": "a sks sketch of a cat", "class": "a sketch of a cat"}
    kernel = torch.randn(4, 4, 3, 3, generator=g)
    calls = []

    def model(noisy, timesteps, conditioning, geometry=None):  # each row scaled by its prompt and timestep: rows stay
        calls.append(geometry)
        scale = conditioning.states[:, :, None, None] + timesteps[:, None, None, None] / 1000
        return torch.nn.functional.conv2d(noisy, kernel, padding=1) * scale

    task = SimpleNamespace(
        parts=[(SimpleNamespace(name=name, batch=lambda step, micro, b=b: b), lambda i, n=name: prompts[n], weight)
               for name, b, weight in (("instance", instance, 1.0), ("class", klass, 0.7))],
        row_prompt=lambda stream, prompt, step, micro, i: prompt,
        text_inputs=lambda ps: {"conditioning": Conditioning(torch.tensor([[len(p) / 10] for p in ps]))},
        objective=DenoisingObjective(DDPMScheduler(), snr_gamma=5.0))
    task.loss_of = lambda batch, prediction: DiffusionTask.loss_of(task, batch, prediction)
    loss = DreamBoothTask.loss(task, model, step=0, micro=0)
    assert len(calls) == 1 and torch.equal(calls[0], torch.cat([instance.geometry, klass.geometry]))  # each row's own
    apart = [task.loss_of(b, model(b.noisy, b.timesteps, **task.text_inputs([prompts[n]] * len(b.noisy))))
             for n, b in (("instance", instance), ("class", klass))]
    torch.testing.assert_close(loss, apart[0] + 0.7 * apart[1])


def test_class_images_are_listed_once_and_split_across_two_processes(db_args, tmp_path):
    """A half-filled class folder, 2 processes: exactly --num_class_images, the missing ones generated once each,
    the same images as one process makes (per-image seeds), the existing ones untouched."""
    common = [*db_args, "--max_train_steps", "1", "--with_prior_preservation", "--class_prompt", "a sketch of a cat",
              "--num_class_images", "5", "--class_inference_steps", "2", "--sample_batch_size", "1"]
    run_script("train/dreambooth.py", *common, "--class_data_dir", tmp_path / "ref", "--output_dir", tmp_path / "a")
    folder = tmp_path / "class"
    folder.mkdir()
    for name in ("class-00001.png", "class-00003.png"):
        (folder / name).write_bytes((tmp_path / "ref" / name).read_bytes())
    (folder / "my-own.png").write_bytes((tmp_path / "ref" / "class-00004.png").read_bytes())
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    proc = launch("train/dreambooth.py", *common, "--class_data_dir", folder, "--output_dir", tmp_path / "b")
    assert proc.stderr.count("generating 2 class images") == 1
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == ["class-00000.png", "class-00001.png", "class-00002.png", "class-00003.png", "my-own.png"]
    assert all(folder.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())
    for name in ("class-00000.png", "class-00002.png"):
        assert (folder / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--instance_category", "unicorn"], "unknown category 'unicorn'"),
        (["--pretrained_model_name_or_path", "/no/such/model"], "not found: /no/such/model"),
        (["--lora_rank", "4", "--train_text_encoder", "--train_text_encoder_ti", "--instance_prompt", "a TOK"], "choose one"),
        (["--lora_rank", "4", "--train_text_encoder", "--lora_type", "lokr"], "needs --lora_type lora"),
        (["--lora_rank", "4", "--text_encoder_lr", "1e-5"], "give --train_text_encoder or --train_text_encoder_ti"),
        (["--enable_xformers_memory_efficient_attention"], "needs a CUDA device"),
        (["--mixed_precision", "fp16"], "fp16 needs a CUDA device"),
        (["--with_prior_preservation"], "needs --class_prompt"),
        (["--resume_from_checkpoint", "checkpoint-99"], "checkpoint not found"),
        (["--resolution", "60"], "multiple of 8"),
        (["--weighting_scheme", "logit_normal"], "is for flow-matching families (SD3, FLUX); sd models: --snr_gamma"),
        pytest.param(["--report_to", "wandb"], "wandb is not installed (pip install wandb)",
                     marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed")),
        (["--optimizer", "prodigy", "--learning_rate", "1e-4"], "estimates its step size"),
        (["--use_dora"], "give --lora_rank"),
        (["--lora_alpha", "8"], "--lora_alpha scales LoRA adapters: give --lora_rank"),
        (["--instance_prompt", "a {kind} sketch"], "{kind} cannot be filled in"),
        (["--instance_data_dir", "/tmp", "--instance_prompt", "a {category}"], "need the shards' categories"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(db_args, tmp_path, extra, message):
    proc = run_script("train/dreambooth.py", *db_args, "--output_dir", tmp_path / "x", "--max_train_steps", "1", *extra,
                      check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed")
def test_what_every_process_meets_alike_is_said_once_per_node(db_args, tmp_path):
    """An unused class-image flag's warning and a missing tracker's error were printed by each of a node's processes
    (8 lines on an 8-GPU node)."""
    proc = launch("train/dreambooth.py", *db_args, "--output_dir", tmp_path / "x", "--max_train_steps", "1",
                  "--class_data_dir", tmp_path / "class", "--report_to", "wandb", check=False)
    assert proc.returncode != 0 and proc.stderr.count("wandb is not installed (pip install wandb)") == 1, proc.stderr[-2000:]
    assert proc.stderr.count("--class_data_dir: not used without --with_prior_preservation") == 1


@pytest.mark.parametrize("accelerate_flags, env, message", [
    (["--config_file", "accelerate_configs/deepspeed_zero2.yaml"], {"ACCELERATE_USE_CPU": "1"}, "silently turns DeepSpeed off"),
    (["--config_file", "accelerate_configs/cpu.yaml", "--mixed_precision", "fp16"], {}, "fp16 needs a CUDA device"),
])
def test_bad_launch_configurations_give_one_line(db_args, tmp_path, accelerate_flags, env, message):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *accelerate_flags, "--num_processes", "1",
           str(REPO / "train/dreambooth.py"), *map(str, db_args), "--output_dir", str(tmp_path), "--max_train_steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode != 0 and message in [line for line in proc.stderr.splitlines() if "error:" in line][0]
    assert 'dreambooth.py", line' not in proc.stderr  # no traceback of ours (the launcher reports the exit code)


def test_non_finite_loss_stops_with_a_clear_message(db_args, tmp_path):
    # An infinite noise offset makes the very first loss infinite.
    proc = run_script("train/dreambooth.py", *db_args, "--output_dir", tmp_path / "nan", "--max_train_steps", "5",
                      "--noise_offset", "1e39", check=False)
    assert proc.returncode == 1
    assert "loss is not finite at step 1" in proc.stderr and "no checkpoint was saved yet" in proc.stderr
    assert not (tmp_path / "nan" / "model_index.json").exists()


def test_8bit_adam_and_cached_latents(db_args, tmp_path, tiny_models):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    common = [*db_args, "--max_train_steps", "3", "--use_8bit_adam"]
    run_script("train/dreambooth.py", *common, "--output_dir", plain, "--cache_latents", "false")
    run_script("train/dreambooth.py", *common, "--output_dir", cached)  # the default: posteriors cached
    base = weights(tiny_models.sd / "unet")
    a, b = weights(plain / "unet"), weights(cached / "unet")
    assert any(not torch.equal(a[k], base[k]) for k in a)  # 8-bit AdamW trained
    assert "torch.uint8" in json.loads((plain / "metrics.json").read_text())["optimizer_dtypes"]["state"]  # its moments
    assert relative_difference(a, b, base) < 1e-2  # cached latents give the same training


def test_deepspeed_zero3_trains_and_consolidates_the_same_weights(db_args, tmp_path, tiny_models):
    """ZeRO-3 (parameters partitioned across ranks) trains the 1-process run's weights. Into a folder where a LoRA
    run had finished, it removes that run's weight file once (rank 0). Preempted during a step's validation (its
    checkpoint saved, no row), the resumed run validates that step first: the rows and mosaics of the run never
    interrupted."""
    one, zero3 = tmp_path / "one", tmp_path / "zero3"
    common = [*db_args, "--max_train_steps", "3", "--train_text_encoder"]
    run_script("train/dreambooth.py", *common, "--output_dir", one, "--train_batch_size", "2")
    run_script("train/dreambooth.py", *db_args, "--max_train_steps", "1", "--lora_rank", "2", "--output_dir", zero3)
    validated = [*common, "--train_batch_size", "1", "--checkpointing_steps", "1", "--validation_steps", "1",
                 "--num_validation_images", "1", "--validation_inference_steps", "1", "--num_heldout_samples", "2"]
    launch("train/dreambooth.py", *validated, "--output_dir", zero3, deepspeed_config="accelerate_configs/deepspeed_zero3.yaml")
    assert json.loads((zero3 / "metrics.json").read_text())["distributed_type"] == "DEEPSPEED"
    for part in ("unet", "text_encoder"):
        base = weights(tiny_models.sd / part)
        assert relative_difference(weights(one / part), weights(zero3 / part), base) < 1e-2, part
    assert not (zero3 / "pytorch_lora_weights.safetensors").exists()
    rows = lambda out: (out / "validation_log.jsonl").read_text().splitlines()  # noqa: E731
    assert [json.loads(row)["step"] for row in rows(zero3)] == [1, 2, 3]
    interrupted = tmp_path / "interrupted"
    shutil.copytree(zero3 / "checkpoint-2", interrupted / "checkpoint-2")
    shutil.copytree(zero3 / "validation", interrupted / "validation")
    (interrupted / "validation" / "step-000002.png").unlink()
    (interrupted / "validation_log.jsonl").write_text(rows(zero3)[0] + "\n")
    launch("train/dreambooth.py", *validated, "--output_dir", interrupted, "--resume_from_checkpoint", "latest",
           deepspeed_config="accelerate_configs/deepspeed_zero3.yaml")
    assert rows(interrupted) == rows(zero3)
    for step in ("step-000002.png", "step-000003.png"):
        assert (interrupted / "validation" / step).read_bytes() == (zero3 / "validation" / step).read_bytes()


# ---- the configurations users run: bf16 x {1 process, DDP, ZeRO-2, ZeRO-3} -------------------------------------------

MATRIX = [*SHARP_ADAM, "--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "2", "--num_validation_images", "1",
          "--validation_inference_steps", "2", "--num_heldout_samples", "2"]
VARIANTS = {
    "unet": [],  # full UNet fine-tuning, frozen text encoder in bf16
    "text_encoder_prior": ["--train_text_encoder", "--with_prior_preservation", "--class_prompt", "a sketch of a cat",
                           "--num_class_images", "2", "--class_inference_steps", "2"],
    "lora": ["--lora_rank", "4", "--learning_rate", "1e-2"],
    # its averaged weights swapped into DeepSpeed's bf16 module for validation, and saved
    "lora_schedulefree": ["--lora_rank", "4", "--learning_rate", "1e-2", "--optimizer", "adamw_schedulefree"],
    # DoRA: each adapted weight's magnitude too, partitioned by ZeRO-3 as any parameter
    "lora_text_encoder": ["--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--train_text_encoder",
                          "--use_dora"],
}


COMPILED_ARGS = ("--torch_compile", "--torch_compile_backend", "aot_eager")


@pytest.mark.parametrize("launcher, variant", [(launcher, variant) for launcher in LAUNCHERS for variant in VARIANTS
                                               if variant != "lora_text_encoder"]
                         + [("zero3_partitioned", "lora")])  # ZeRO-3 partitioning even the adapters: saved gathered
def test_bf16_matrix(launcher, variant, db_args, tmp_path, tmp_path_factory, tiny_models):
    from diffusers import StableDiffusionPipeline

    class_dir = tmp_path / "class"  # prior preservation: the 1-process runs keep the folder of the test that made them
    extra = [*VARIANTS[variant], "--class_data_dir", class_dir] if "prior" in variant else VARIANTS[variant]
    # The LoRA's DDP and ZeRO-2 runs compiled (--torch_compile; aot_eager: dynamo's graphs and their recompiles,
    # without inductor's minutes of C++ on a CPU), compared with the eager 1-process run. Not ZeRO-3: its hooks,
    # traced into the graphs, still compile a few at step 2 (README), after this run's first read at step 1.
    compiled = launcher in ("ddp", "zero2") and variant == "lora"
    out, one, one_fp32 = run_matrix_case(launcher, f"db-{variant}", "train/dreambooth.py", [*db_args, *MATRIX, *extra],
                                         tmp_path, tmp_path_factory, launcher_args=COMPILED_ARGS if compiled else ())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["heldout_loss"] == metrics["heldout_loss"]  # finite, not NaN
    if compiled:  # the checkpoint at step 1 and the validation at 2 between compiled steps recompile nothing
        assert metrics["compiled_graphs"] > 0 and metrics["graphs_compiled_after_first_read"] == 0, metrics
    assert (out / "validation" / "step-000002.png").is_file() and (out / "checkpoint-1").is_dir()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd)
    if variant.startswith("lora"):
        pipe.load_lora_weights(out)  # plain diffusers loads it
        b = weights(out)
        assert {v.dtype for v in b.values()} == {torch.float32}  # fp32 adapters, also from DeepSpeed's bf16 module
        a, a32 = ({k: v for k, v in weights(run).items() if "lora.up" in k} for run in (one, one_fp32))
        assert a  # lora_B ("up") starts at zero: all of it is training
        assert_agrees_within_bf16(a, b, a32, {k: torch.zeros_like(v) for k, v in a.items()})
        if launcher in ("1", "ddp"):  # the checkpoint holds the adapters, not a second copy of the UNet
            saved = weights(out / "checkpoint-1")
            assert saved and all("lora" in k for k in saved), [k for k in saved if "lora" not in k][:3]
    else:
        trained = StableDiffusionPipeline.from_pretrained(out)
        part = "text_encoder" if variant == "text_encoder_prior" else "unet"
        assert_agrees_within_bf16(weights(one / part), weights(out / part), weights(one_fp32 / part),
                                  weights(tiny_models.sd / part))
        # generation from checkpoint-1 (no pipeline in it; DeepSpeed's read by its own reader) has step 1's weights
        from sketch2real.generation import load_generation_pipeline

        prefix = "model.safetensors:" + ("denoiser." if part == "unet" else "text_encoders.encoders.text_encoder.")
        at_step_1, at_step_1_fp32 = ({k[len(prefix):]: v for k, v in weights(run / "checkpoint-1").items()
                                      if k.startswith(prefix)} for run in (one, one_fp32))
        loaded = getattr(load_generation_pipeline(str(out / "checkpoint-1"), torch.device("cpu"), torch.float32),
                         part).state_dict()
        loaded = {k: loaded[k] for k in at_step_1}
        assert_agrees_within_bf16(at_step_1, loaded, at_step_1_fp32,
                                  {k: v for k, v in getattr(pipe, part).state_dict().items() if k in at_step_1})
        if launcher == "1":
            assert all(torch.equal(loaded[k], v) for k, v in at_step_1.items())
        if variant == "text_encoder_prior":
            te = trained.text_encoder.state_dict()
            assert any(not torch.equal(te[k], v) for k, v in pipe.text_encoder.state_dict().items())
            class_dir = Path(json.loads((out / "run_config.json").read_text())["class_data_dir"])
            assert sorted(p.name for p in class_dir.glob("*.png")) == ["class-00000.png", "class-00001.png"]


def test_a_peft_too_old_for_the_installed_transformers_text_encoder_adapters_is_one_line(tiny_models, shard_dir,
                                                                                         tmp_path, monkeypatch):
    """transformers 5.25 adds a text encoder's adapters only with peft >= 0.22, and pip keeps an installed peft 0.21
    that meets requirements.txt: a traceback from `add_adapter` after loading, before; one line, before loading."""
    import transformers.integrations.peft

    from sketch2real.cli import UserError
    from sketch2real.training.dreambooth import DreamBoothOptions, DreamBoothTask

    from .helpers import in_process_accelerator

    monkeypatch.setattr(transformers.integrations.peft, "MIN_PEFT_VERSION", "99.0")
    opts = DreamBoothOptions(pretrained_model_name_or_path=str(tiny_models.sd), shard_dir=str(shard_dir),
                             output_dir=str(tmp_path), instance_category="cat", resolution=32, lora_rank=4)
    DreamBoothTask(opts, in_process_accelerator("bf16"))  # the denoiser's adapters alone: peft's own
    with pytest.raises(UserError, match=r"transformers .* adds the text encoders' adapters with peft >= 99.0, and peft"):
        DreamBoothTask(dataclasses.replace(opts, train_text_encoder=True), in_process_accelerator("bf16"))


def test_lora_with_train_text_encoder_adapts_the_encoder_and_plain_diffusers_reloads_it_at_its_alpha(db_args, tmp_path,
                                                                                                     tiny_models):
    """--lora_rank --train_text_encoder, as diffusers' LoRA scripts: adapters on the text encoder's attention train with
    the UNet's, are saved beside them (diffusers' keys and kohya's `lora_te_`), reload in plain diffusers at their
    alpha, and --initial_lora continues both (a run that would drop the encoder's is refused in one line)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    out, again = tmp_path / "te", tmp_path / "again"
    common = [*db_args, "--lora_rank", "4", "--lora_alpha", "8", "--max_train_steps", "1", "--report_to", "none"]
    run_script("train/dreambooth.py", *common, "--train_text_encoder", "--learning_rate", "1e-2", "--lora_format",
               "comfyui", "--output_dir", out)
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    # one AdamW step moves each weight by its rate (lr x sign): SD 1.x's encoder adapters learn at --learning_rate,
    # as in its diffusers script (no --text_encoder_lr there; SDXL's: test_text_encoder_adapters_learn_at_...)
    for part in ("unet", "text_encoder"):
        moved = max(v.abs().max().item() for k, v in saved.items() if k.startswith(f"{part}.") and k.endswith(".up.weight"))
        assert moved == pytest.approx(1e-2, rel=1e-3), part
    # named as the encoder's checkpoints and transformers 4 name its modules (transformers 5 dropped `text_model.`)
    encoder_keys = [k for k in saved if k.startswith("text_encoder.")]
    assert encoder_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in encoder_keys)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd, safety_checker=None)
    ids = pipe.tokenizer(["a sks sketch of a cat"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    base = CLIPTextModel.from_pretrained(tiny_models.sd / "text_encoder")(ids)[0]
    pipe.load_lora_weights(out)
    assert [c.lora_alpha for c in pipe.text_encoder.peft_config.values()] == [8]
    assert not torch.allclose(pipe.text_encoder(ids)[0], base)  # the encoder's adapters trained
    kohya = load_file(out / "pytorch_lora_weights_comfyui.safetensors")
    encoder_alphas = {k: v for k, v in kohya.items() if k.startswith("lora_te_text_model_encoder_layers_") and k.endswith(".alpha")}
    assert encoder_alphas and all(float(v) == 8 for v in encoder_alphas.values())

    run_script("train/dreambooth.py", *common, "--train_text_encoder", "--learning_rate", "1e-30", "--max_train_steps",
               "1", "--initial_lora", out, "--output_dir", again)  # a step that moves nothing: what was loaded is saved
    continued = load_file(again / "pytorch_lora_weights.safetensors")
    assert continued.keys() == saved.keys() and all(torch.allclose(continued[k], v, rtol=1e-6, atol=0) for k, v in saved.items())
    proc = run_script("train/dreambooth.py", *common, "--initial_lora", out, "--output_dir", tmp_path / "drop", check=False)
    assert proc.returncode == 2 and "also adapts text_encoder: give --train_text_encoder" in proc.stderr.strip().splitlines()[-1]
    proc = run_script("train/dreambooth.py", *common, "--initial_lora", out, "--pretrained_model_name_or_path",
                      tiny_models.flux, "--output_dir", tmp_path / "flux", check=False)  # refused before weights load
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        f"--initial_lora {out} is a LoRA of a sd model (its run_config.json), {tiny_models.flux} is a flux model: give a "
        "base model of its family"), proc.stderr[-2000:]


def test_sdxl_text_encoder_adapters_learn_at_diffusers_rate_and_a_diffusers_lora_continues(db_args, tiny_models, tmp_path):
    """One AdamW step moves each weight by its group's learning rate (the first step's update is lr x sign): SDXL's
    text encoders' adapters (lora_B, from zero) by 5e-6 (diffusers' --text_encoder_lr default there), the UNet's by
    --learning_rate; --text_encoder_lr sets it. A LoRA of diffusers' SDXL script (adapters on the first encoder's
    unread last layer too) continues."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    args = [*db_args, "--pretrained_model_name_or_path", tiny_models.sdxl, "--lora_rank", "4",
            "--train_text_encoder", "--learning_rate", "1e-2", "--max_train_steps", "1"]
    for extra, expected in (([], 5e-6), (["--text_encoder_lr", "3e-4"], 3e-4)):
        out = tmp_path / str(expected)
        run_script("train/dreambooth.py", *args, *extra, "--output_dir", out)
        saved = load_file(out / "pytorch_lora_weights.safetensors")
        moved = {part: max(v.abs().max().item() for k, v in saved.items() if k.startswith(f"{part}.") and k.endswith(".up.weight"))
                 for part in ("unet", "text_encoder")}
        assert moved["unet"] == pytest.approx(1e-2, rel=1e-3) and moved["text_encoder"] == pytest.approx(expected, rel=1e-3)

    # diffusers' SDXL script also adapts the first encoder's unread last layer: such a file continues
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as f:
        metadata = f.metadata()
    extra = {k.replace(".layers.0.", ".layers.1."): torch.zeros_like(v) for k, v in saved.items()
             if k.startswith("text_encoder.") and ".layers.0." in k}
    (tmp_path / "diffusers").mkdir()
    save_file({**saved, **extra}, tmp_path / "diffusers" / "pytorch_lora_weights.safetensors", metadata=metadata)
    StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl).load_lora_weights(tmp_path / "diffusers")
    run_script("train/dreambooth.py", *args, "--learning_rate", "1e-30", "--text_encoder_lr", "1e-30", "--initial_lora",
               tmp_path / "diffusers", "--output_dir", tmp_path / "continued")
    continued = load_file(tmp_path / "continued" / "pytorch_lora_weights.safetensors")
    assert continued.keys() == saved.keys() and all(torch.allclose(continued[k], saved[k], rtol=1e-6, atol=1e-20)
                                                    for k in saved)


def test_whole_flow_text_encoders_learn_at_diffusers_full_script_rate(tiny_models, shard_dir, tmp_path):
    """Full SD3 DreamBooth with --train_text_encoder: one AdamW step moves the transformer by --learning_rate and the
    CLIP encoders by 5e-6 (diffusers' train_dreambooth_sd3.py's --text_encoder_lr; they moved at 1e-4 before), or by
    --text_encoder_lr when given (it was refused without --lora_rank)."""
    from diffusers import StableDiffusion3Pipeline

    base = StableDiffusion3Pipeline.from_pretrained(tiny_models.sd3)
    args = ["--pretrained_model_name_or_path", tiny_models.sd3, "--shard_dir", shard_dir, "--instance_category", "cat",
            "--resolution", "64", "--train_text_encoder", "--max_train_steps", "1", "--adam_weight_decay", "0",
            "--validation_steps", "0", "--checkpointing_steps", "0", "--num_heldout_samples", "0", "--report_to", "none"]
    for extra, expected in (([], 5e-6), (["--text_encoder_lr", "3e-4", "--adam_weight_decay_text_encoder", "0"], 3e-4)):
        out = tmp_path / str(expected)
        run_script("train/dreambooth.py", *args, *extra, "--output_dir", out)
        trained = StableDiffusion3Pipeline.from_pretrained(out)
        moved = {name: max((a - b).abs().max().item() for a, b in zip(getattr(trained, name).parameters(),
                                                                        getattr(base, name).parameters()))
                 for name in ("transformer", "text_encoder", "text_encoder_2")}
        assert moved["transformer"] == pytest.approx(1e-4, rel=0.05), moved
        assert moved["text_encoder"] == pytest.approx(expected, rel=0.05) and \
            moved["text_encoder_2"] == pytest.approx(expected, rel=0.05), moved


# ---- SDXL, read from the model: the same loop, the same guarantees --------------------------------------------------

SDXL_CASES = [("1", "unet"), ("zero3", "unet"), ("1", "lora"),  # DDP: TI and sequential tests
              ("zero3", "lora_text_encoder"),  # both encoders' DoRA adapters (none where no gradient would reach them)
              ("zero2", "text_encoder_prior")]  # both text encoders trained by DeepSpeed, SDXL class images


@pytest.mark.parametrize("launcher, variant", SDXL_CASES)
def test_sdxl_bf16(launcher, variant, tiny_models, shard_dir, tmp_path, tmp_path_factory):
    """DreamBooth on a tiny SDXL (two text encoders, pooled embedding, micro-conditioning): outputs load in plain
    StableDiffusionXLPipeline, and 2 processes agree with 1 as on SD 1.x."""
    from diffusers import StableDiffusionXLPipeline

    extra = [*VARIANTS[variant], "--class_data_dir", tmp_path / "class"] if "prior" in variant else VARIANTS[variant]
    args = ["--pretrained_model_name_or_path", tiny_models.sdxl, "--shard_dir", shard_dir, "--instance_category", "cat",
            "--instance_prompt", "a sks sketch of a cat", "--resolution", "64", "--learning_rate", "1e-3", "--report_to",
            "none", *MATRIX, *extra]
    out, one, one_fp32 = run_matrix_case(launcher, f"sdxl-{variant}", "train/dreambooth.py", args, tmp_path, tmp_path_factory)
    assert (out / "validation" / "step-000002.png").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
    if variant.startswith("lora"):
        pipe.load_lora_weights(out)
        a, b, a32 = ({k: v for k, v in weights(run).items() if "up.weight" in k} for run in (one, out, one_fp32))
        assert a and {v.dtype for v in b.values()} == {torch.float32}
        assert_agrees_within_bf16(a, b, a32, {k: torch.zeros_like(v) for k, v in a.items()})
        if "--use_dora" in extra:  # every component's magnitudes, as the 1-process run trained them from their start
            m, m_out = ({k: v for k, v in weights(run).items() if "lora_magnitude_vector" in k} for run in (one, out))
            assert {k.split(":")[1].split(".")[0] for k in m} == {"unet", "text_encoder", "text_encoder_2"}
            # (a bf16 run starts them at the bf16 weights' row norms: 2 steps from there are half of fp32's rounding,
            # so not measured against the fp32 run; 0.2% more in ZeRO-3's magnitudes fails this by 18x)
            start = _base_row_norms(tiny_models.sdxl, m, torch.bfloat16)
            assert relative_difference(m, m_out, start) < 0.05, relative_difference(m, m_out, start)
        encoders = {k.split(":")[1].split(".")[0] for k in b} - {"unet"}
        assert encoders == ({"text_encoder", "text_encoder_2"} if "text_encoder" in variant else set())
        # the first encoder's last layer (SDXL reads its penultimate) has no adapters: they would get no gradient
        assert not [k for k in b if k.split(":")[1].startswith("text_encoder.") and ".layers.1." in k]
        if encoders:
            assert [c.lora_alpha for e in (pipe.text_encoder, pipe.text_encoder_2) for c in e.peft_config.values()] == [8, 8]
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(out)
        for part in ("unet", "text_encoder", "text_encoder_2") if "text_encoder" in variant else ("unet",):
            base = weights(tiny_models.sdxl / part)
            assert_agrees_within_bf16(weights(one / part), weights(out / part), weights(one_fp32 / part), base)
            trained = weights(out / part)
            # every weight that shapes the conditioning trains; the first encoder's last layer and final norm
            # (SDXL reads its penultimate layer) stay the base's
            frozen = {k for k in base if part == "text_encoder" and (".layers.1." in k or "final_layer_norm" in k)}
            assert frozen or part != "text_encoder"
            assert all(torch.equal(trained[k], base[k]) == (k in frozen) for k in base if k.endswith("weight")), part
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a sks sketch of a cat", height=64, width=64, num_inference_steps=2, original_size=(256, 256),
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_validation_epochs_validate_every_n_passes_over_the_instance_images(db_args, tmp_path):
    """--validation_epochs (diffusers' LoRA scripts' flag): 3 instance images at a batch of 1 are 3 steps a pass, so
    every 2 passes is every 6 steps (and at the end, as always); the run's config records the steps it used."""
    out = tmp_path / "epochs"
    run_script("train/dreambooth.py", *db_args, "--output_dir", out, "--num_instance_images", "3", "--max_train_steps", "7",
               "--validation_epochs", "2", "--num_heldout_samples", "2", "--num_validation_images", "0")
    steps = [json.loads(line)["step"] for line in (out / "validation_log.jsonl").read_text().splitlines()]
    assert steps == [6, 7]
    config = json.loads((out / "run_config.json").read_text())
    assert (config["validation_epochs"], config["validation_steps"]) == (2, 6)


def test_category_in_validation_prompts_is_filled_in_and_a_class_prompt_naming_it_is_refused(db_args, tmp_path):
    """{category} in --validation_prompt was drawn as literal text: a row per category of the run now (the instance
    category, or the set's first four), the other prompts one row each; in --class_prompt (the class images' literal
    prompt, braces and all) it is refused in one line (one class set; sequential DreamBooth fills it in per stage)."""
    from types import SimpleNamespace

    from sketch2real.cli import UserError, parse_options
    from sketch2real.training.dreambooth import DreamBoothOptions, DreamBoothTask

    def rows(*args: str, categories=("cat", "apple", "airplane", "car_(sedan)", "dog")) -> list:
        opts = parse_options(DreamBoothOptions, ["--pretrained_model_name_or_path", "m", "--output_dir", "o",
                                                 "--shard_dir", "s", *args])
        opts.check()
        return DreamBoothTask.validation_rows(SimpleNamespace(opts=opts, categories=list(categories)))

    assert rows("--instance_prompt", "a sks sketch of a {category}", "--validation_prompt", "a sks sketch of a {category}",
                "a sks drawing") == [("a sks sketch of a airplane", "airplane"), ("a sks sketch of a apple", "apple"),
                                     ("a sks sketch of a car (sedan)", "car_(sedan)"), ("a sks sketch of a cat", "cat"),
                                     ("a sks drawing", None)]
    assert rows("--instance_prompt", "a sks sketch of a {category}", "--instance_category", "cat") == [
        ("a sks sketch of a cat", "cat")]
    # a prompt without {category} is of the instance category where it is the instance prompt or names the category
    # (a sequential stage's prompts come filled in): "a photo of a dog" beside cat was scored as a cat
    assert rows("--instance_prompt", "a sks sketch", "--instance_category", "cat", "--validation_prompt", "a sks sketch",
                "a Cat in the style of sks", "a photo of a dog", "a caterpillar") == [
        ("a sks sketch", "cat"), ("a Cat in the style of sks", "cat"), ("a photo of a dog", None), ("a caterpillar", None)]
    # a category whose words end in ")" (no \b after it): its row had no category, so no content accuracy
    assert rows("--instance_prompt", "a sks sketch", "--instance_category", "car_(sedan)", "--validation_prompt",
                "a car (sedan) in the style of sks") == [("a car (sedan) in the style of sks", "car_(sedan)")]
    # pivotal tuning's --token_abstraction "<sks>" was refused: "does not contain --token_abstraction" (diffusers takes it)
    pivotal = parse_options(DreamBoothOptions, ["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--shard_dir",
                                                "s", "--instance_prompt", "a <sks> sketch of a cat", "--train_text_encoder_ti",
                                                "--token_abstraction", "<sks>", "--lora_rank", "4"])
    pivotal.check()
    # literal braces are drawn as trained: "a {sks} sketch" (validation drew "a {{sks}} sketch")
    assert rows("--instance_prompt", "a {{sks}} sketch", "--instance_category", "cat") == [("a {sks} sketch", "cat")]
    with pytest.raises(UserError, match="--validation_prompt 'a {kind}': {kind} cannot be filled in"):
        rows("--instance_prompt", "a sks sketch", "--validation_prompt", "a {kind}")
    proc = run_script("train/dreambooth.py", *db_args, "--with_prior_preservation", "--class_prompt", "a sketch of a {category}",
                      "--class_data_dir", tmp_path / "class", "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "--class_prompt 'a sketch of a {category}'" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "class").exists()


def test_class_image_flags_without_prior_preservation_are_warned_about_in_one_line(db_args, tmp_path, caplog):
    """--class_prompt, --class_data_dir, --num_class_images, --prior_loss_weight... were ignored silently without
    --with_prior_preservation: one warning line names those given (diffusers' scripts warn too), not an error."""
    from sketch2real.cli import parse_options
    from sketch2real.training.dreambooth import DreamBoothOptions

    proc = run_script("train/dreambooth.py", *db_args, "--class_data_dir", tmp_path / "class", "--prior_loss_weight", "0.5",
                      "--weighting_scheme", "logit_normal", "--output_dir", tmp_path / "x", check=False)  # refused later
    assert proc.returncode == 2 and "is for flow-matching families" in proc.stderr.strip().splitlines()[-1]
    assert "--class_data_dir, --prior_loss_weight: not used without --with_prior_preservation" in proc.stderr
    base = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path), "--shard_dir", "s"]
    parse_options(DreamBoothOptions, [*base, "--with_prior_preservation", "--class_prompt", "a sketch", "--class_data_dir",
                                      "c", "--num_class_images", "5"]).check()
    parse_options(DreamBoothOptions, base).check()
    assert "with_prior_preservation" not in caplog.text  # used, or not given: no warning
    parse_options(DreamBoothOptions, [*base, "--num_class_images", "5"]).check()
    assert "--num_class_images: not used without --with_prior_preservation" in caplog.text


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_to_hub_fails_before_training_without_login_and_uploads_the_model_without_resume_state(db_args, tmp_path):
    """--push_to_hub as diffusers' scripts: the repository is created at the start (not logged in or offline: one line,
    exit 2, before anything trains) and the output folder is one commit at the end, but its checkpoints and latent
    cache (its TensorBoard logs, under --tracker_project_name, included); the card loads from the repository. A failed
    upload keeps the model and names the command that retries it, and that command uploads the same files."""
    hub = FakeHub(tmp_path / "hub")
    lora = [*db_args, "--max_train_steps", "2", "--lora_rank", "4", "--checkpointing_steps", "1", "--push_to_hub"]
    try:
        for env, message in ((hub.env(token=None), "Invalid username or password"), ({"HF_HUB_OFFLINE": "1"}, "offline")):
            out = tmp_path / "refused"
            proc = run_script("train/dreambooth.py", *lora, "--output_dir", out, "--hub_model_id", "lab/style", env=env,
                              check=False)
            last = proc.stderr.strip().splitlines()[-1]
            assert proc.returncode == 2 and "'lab/style'" in last and message in last and "hf auth login" in last, last
            assert not (out / "run_config.json").exists() and not (out / "latent_cache").exists()

        out = tmp_path / "sketch-lora"
        # what a job killed while writing left (most of a staged pipeline; a checkpoint cut short; a temp file): not
        # pushed, not kept (a quota's gigabytes each)
        leftovers = [out / ".pipeline-k1ll3d_0" / "unet" / "diffusion_pytorch_model.safetensors",
                     out / "checkpoint-7.partial" / "model.safetensors",
                     out / ".pytorch_lora_weights.safetensors.x1b2_c3d.tmp", out / ".tmpA1b2C3"]
        for path in [*leftovers, out / ".mine.tmp"]:  # (a file by another name is not ours to remove)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half")
        proc = run_script("train/dreambooth.py", *lora, "--output_dir", out, "--report_to", "tensorboard",
                   "--tracker_project_name", "sketch-style", "--validation_steps", "100", "--num_validation_images", "1",
                   "--validation_inference_steps", "2", env=hub.env())
        local = _files(out)
        assert not any(path.exists() or path.parent.exists() for path in leftovers[:2])
        assert not any(path.exists() for path in leftovers[2:]) and (out / ".mine.tmp").is_file()
        assert f"removed {out / '.pipeline-k1ll3d_0'} (left by a job killed while writing it)" in proc.stderr
        (out / ".mine.tmp").unlink()
        assert any(name.startswith("logs/sketch-style/events.out.tfevents") for name in local)  # the hub shows them
        # the final validation's values reach TensorBoard too (they came after the last step's logs were sent), once
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "logs" / "sketch-style")).Reload()
        assert [e.step for e in events.Scalars("heldout_loss")] == [2] and [e.step for e in events.Scalars("loss")] == [1, 2]
        assert any(name.startswith("checkpoint-1/") for name in local) and any(
            name.startswith("latent_cache/") for name in local)
        kept = {name: data for name, data in local.items() if not name.startswith(("checkpoint-", "latent_cache/"))}
        assert _files(hub.root / "tester/sketch-lora") == kept and "pytorch_lora_weights.safetensors" in kept
        assert hub.commits == [{"repo": "tester/sketch-lora", "message": "End of training: 2 steps"}]
        card = kept["README.md"].decode()
        # offline (HF_HUB_OFFLINE=1) diffusers reads a cached hub LoRA only given its file's name
        assert "pipe.load_lora_weights('tester/sketch-lora', weight_name='pytorch_lora_weights.safetensors')" in card
        assert "hf download tester/sketch-lora --local-dir sketch-lora" in card and str(out) not in card

        hub.refuse_commits = True  # the network goes down during the training
        out = tmp_path / "second"
        proc = run_script("train/dreambooth.py", *lora, "--output_dir", out, env=hub.env(), check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "the upload to tester/second failed" in last, proc.stderr[-2000:]
        assert (out / "pytorch_lora_weights.safetensors").is_file() and len(hub.commits) == 1
        hub.refuse_commits = False
        retry = shlex.split(last.split("`")[1])
        assert retry[:2] == ["hf", "upload"]
        subprocess.run([str(Path(sys.executable).with_name("hf")), *retry[1:]], check=True, capture_output=True,
                       env={**os.environ, **hub.env()}, timeout=300)
        assert _files(hub.root / "tester/second") == {
            name: data for name, data in _files(out).items() if not name.startswith(("checkpoint-", "latent_cache/"))}
    finally:
        hub.close()


def test_the_card_s_lines_load_the_run_s_vae_and_call_the_pipeline_as_training_conditioned(tmp_path):
    """A run with another VAE (SDXL's fp16 fix) and SDXL's size conditioning: the card's diffusers lines load that
    VAE and pass the original size training gave (they loaded the base's VAE and left SDXL at its default size); SD3's
    prompts at the T5 length training used (77; the pipeline's default is 256)."""
    from sketch2real.family import FAMILIES
    from sketch2real.training.model_card import usage

    card = usage("lora", "stabilityai/stable-diffusion-xl-base-1.0", tmp_path, "a sks sketch", FAMILIES["sdxl"],
                 vae="madebyollin/sdxl-vae-fp16-fix")
    assert "vae = AutoencoderKL.from_pretrained('madebyollin/sdxl-vae-fp16-fix')" in card
    assert "DiffusionPipeline.from_pretrained('stabilityai/stable-diffusion-xl-base-1.0', vae=vae)" in card
    assert "from diffusers import AutoencoderKL, DiffusionPipeline" in card
    # generate.py's guidance, not the pipeline's default (SDXL's 5.0 drew another image than generate.py's line)
    assert "image = pipe(prompt='a sks sketch', guidance_scale=7.5, original_size=(256, 256), crops_coords_top_left=(0, 0)).images[0]" in card
    sd3 = usage("lora", "stabilityai/stable-diffusion-3.5-medium", tmp_path, "a sks sketch", FAMILIES["sd3"])
    assert "image = pipe(prompt='a sks sketch', guidance_scale=7.0, max_sequence_length=77).images[0]" in sd3 and "vae" not in sd3
    klein = usage("lora", "black-forest-labs/FLUX.2-klein-4B", tmp_path, "a sks sketch", FAMILIES["flux2-klein"], vae="my/vae")
    assert "vae = AutoencoderKLFlux2.from_pretrained('my/vae')" in klein and "import AutoencoderKLFlux2, " in klein
    # the command line as bash reads it: a prompt with both quotes, a backslash and `$`, a folder with a space
    import shlex

    prompt = """a "sks" sketch, the cat's $HOME \\ `pwd`"""
    card = usage("embeddings", "base model", tmp_path / "my run", prompt, FAMILIES["sd"])
    command = shlex.split(card.split("```bash\n", 1)[1].split("\n```", 1)[0])
    assert command[command.index("--prompts") + 1] == prompt
    assert command[command.index("--pretrained_model_name_or_path") + 1] == "base model"
    assert command[command.index("--textual_inversion") + 1] == str(tmp_path / "my run" / "learned_embeds.safetensors")


def test_a_stage_s_card_loads_its_full_pipeline_from_the_run_s_repository(tiny_models, tmp_path, monkeypatch):
    """A sequential full fine-tune's stage is a folder of the run's hub repository: `from_pretrained` reads no
    subfolder of a repository, so the card downloads that folder and loads it; the command reads it downloaded."""
    import shlex
    import shutil

    import huggingface_hub

    from sketch2real.family import FAMILIES
    from sketch2real.training.model_card import usage

    card = usage("pipeline", "base", tmp_path / "seq" / "stage-02-apple", "a sks sketch of an apple", FAMILIES["sd"],
                 repo_id="lab/forgetting", subfolder="stage-02-apple")
    bash = card.split("```bash\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert bash[0] == "hf download lab/forgetting --include 'stage-02-apple/*' --local-dir forgetting"
    command = shlex.split(bash[1])
    assert command[command.index("--pretrained_model_name_or_path") + 1] == "forgetting/stage-02-apple"
    repository = tmp_path / "repository"  # what the download gives: the repository's folder holding the stage
    shutil.copytree(tiny_models.sd, repository / "stage-02-apple")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns: asked.append((repo_id, allow_patterns)) or str(repository))
    names: dict = {}
    code = card.split("```python\n", 1)[1].split("\n```", 1)[0]
    exec("\n".join(line for line in code.splitlines() if not line.startswith("image = pipe(")), names)  # noqa: S102 (but the call)
    assert asked == [("lab/forgetting", ["stage-02-apple/*"])] and type(names["pipe"]).__name__ == "StableDiffusionPipeline"


def test_a_run_of_other_settings_into_a_folder_leaves_no_earlier_weight_file_the_card_or_generation_would_load(
        db_args, tmp_path):
    """A full fine-tune saved where a LoRA run (ComfyUI copy, EMA) had finished kept the LoRA files: the card (titled
    "lora") and generation loaded the base model with the old LoRA. Its weight files are removed once the new run's
    are saved; a user's own file stays."""
    from sketch2real.training.model_card import output_kind

    out = tmp_path / "out"
    lora = [*db_args, "--max_train_steps", "1", "--lora_rank", "2", "--output_dir", out]
    run_script("train/dreambooth.py", *lora, "--lora_format", "comfyui", "--use_ema")
    earlier = {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_comfyui.safetensors",
               "without_ema/pytorch_lora_weights.safetensors"}
    assert earlier <= set(json.loads((out / "metrics.json").read_text())["outputs"])
    (out / "notes.txt").write_text("mine")
    proc = run_script("train/dreambooth.py", *db_args, "--max_train_steps", "1", "--output_dir", out)
    assert not any((out / name).exists() for name in earlier) and not (out / "without_ema").exists()
    assert (out / "notes.txt").read_text() == "mine" and "removed 5 file(s) of the weights" in proc.stderr  # without_ema/ whole
    assert output_kind(out) == "pipeline" and not earlier & set(json.loads((out / "metrics.json").read_text())["outputs"])
    assert not (out / ".earlier_outputs.json").exists()  # what this run saw at its start (a resume reads it): done


def test_a_resumed_run_s_validation_log_lists_each_step_once_and_a_fresh_one_drops_an_earlier_run_s(db_args, tmp_path):
    """Killed after validating step 2 but before checkpointing it: the resumed run validates steps 2 and 3 again, and
    validation_log.jsonl listed them twice (a plot of it zig-zagged). Preempted during a step's validation, the resumed
    run validates that step first. A run started afresh in the folder drops the earlier run's lines and mosaics (the
    card showed the last one). TensorBoard's curves too showed the steps after the checkpoint twice."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [*db_args, "--max_train_steps", "3", "--checkpointing_steps", "1", "--validation_steps", "1",
            "--num_validation_images", "1", "--validation_inference_steps", "1", "--num_heldout_samples", "2",
            "--report_to", "tensorboard", "--logging_steps", "1"]
    straight = tmp_path / "straight"
    run_script("train/dreambooth.py", *args, "--output_dir", straight)
    steps = lambda out: [json.loads(line)["step"] for line in (out / "validation_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert steps(straight) == [1, 2, 3]

    def logged_steps(out: Path) -> dict[str, list[int]]:
        events = EventAccumulator(str(out / "logs" / "dreambooth"))
        events.Reload()
        return {tag: [e.step for e in events.Scalars(tag)] for tag in ("loss", "heldout_loss")}

    assert logged_steps(straight) == {"loss": [1, 2, 3], "heldout_loss": [1, 2, 3]}
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("checkpoint-1", "validation", "logs"):  # killed after step 3: its events written, checkpoint-1 kept
        shutil.copytree(straight / name, resumed / name)
    shutil.copy(straight / "validation_log.jsonl", resumed)
    run_script("train/dreambooth.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
    assert steps(resumed) == [1, 2, 3]
    assert logged_steps(resumed) == {"loss": [1, 2, 3], "heldout_loss": [1, 2, 3]}  # [1, 2, 3, 2, 3] before
    (resumed / "metrics.json").unlink()  # killed after its last checkpoint and validation, before the final save:
    run_script("train/dreambooth.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
    assert steps(resumed) == [1, 2, 3]  # the last step validated again, listed once (twice before)
    # preempted during step 2's validation: checkpoint-2 saved, no row or mosaic of step 2. The resumed run validated
    # from step 3 on, and step 2's point was lost for good; it is validated first now, as the straight run did
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight / "checkpoint-2", interrupted / "checkpoint-2")
    (interrupted / "validation").mkdir()
    shutil.copy(straight / "validation" / "step-000001.png", interrupted / "validation")
    (interrupted / "validation_log.jsonl").write_text((straight / "validation_log.jsonl").read_text().splitlines()[0] + "\n")
    run_script("train/dreambooth.py", *args, "--output_dir", interrupted, "--resume_from_checkpoint", "latest")
    rows = lambda out: (out / "validation_log.jsonl").read_text().splitlines()  # noqa: E731
    assert rows(interrupted) == rows(straight) and steps(interrupted) == [1, 2, 3]
    assert (interrupted / "validation" / "step-000002.png").read_bytes() == (straight / "validation" / "step-000002.png").read_bytes()
    run_script("train/dreambooth.py", *db_args, "--max_train_steps", "1", "--validation_steps", "1",
               "--num_validation_images", "1", "--validation_inference_steps", "1", "--num_heldout_samples", "2",
               "--output_dir", resumed)
    assert steps(resumed) == [1] and sorted(p.name for p in (resumed / "validation").iterdir()) == ["step-000001.png"]



def test_pivotal_validation_gives_the_pipeline_the_tokens_its_loader_expands_to_the_trained_ones(tiny_models, tmp_path):
    """Pivotal tuning trains `a <s0> <s0>_1 sketch` for `a TOK sketch`; the validation pipeline, with diffusers'
    loader, spells `<s0>` out itself: it is given `a <s0> sketch` (spelt out first, it drew `<s0> <s0>_1 <s0> <s0>_1_1`)."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline

    from sketch2real.family import placeholder_tokens
    from sketch2real.training.dreambooth import PIVOTAL_TOKEN, DreamBoothTask

    task = DreamBoothTask.__new__(DreamBoothTask)  # the prompts need only the options and the new tokens
    task.opts, task.new_tokens = SimpleNamespace(token_abstraction="TOK"), placeholder_tokens(PIVOTAL_TOKEN, 2)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd)
    pipe.load_textual_inversion(torch.zeros(2, pipe.text_encoder.config.hidden_size), token=PIVOTAL_TOKEN)
    trained = task.prompt_transform("a TOK sketch")
    assert trained == "a <s0> <s0>_1 sketch"
    assert task.pipeline_prompt(pipe, "a TOK sketch") == "a <s0> sketch"
    assert pipe.maybe_convert_prompt(task.pipeline_prompt(pipe, "a TOK sketch"), pipe.tokenizer) == trained


def test_sdxl_on_a_folder_states_each_image_s_own_size_and_crop_and_draws_at_the_drawn_size(tiny_models, tmp_path):
    """SDXL's time ids on the user's own images are each image's (original height, width, crop top, left, target), as
    diffusers' SDXL DreamBooth script computes them (shorter side resized, center crop); on the shards, Sketchy's
    256 px. Generation then states the drawn size (the pipeline's default) for a folder run, 256 px for a shard run:
    validation, the card's line and generate.py."""
    from PIL import Image

    from sketch2real.cli import parse_options
    from sketch2real.family import FAMILIES
    from sketch2real.generation import trained_on_own_images
    from sketch2real.training.accelerator import make_accelerator
    from sketch2real.training.dreambooth import DreamBoothOptions, DreamBoothTask
    from sketch2real.training.model_card import usage

    folder = tmp_path / "mine"
    folder.mkdir()
    for name, size in {"a-landscape.png": (96, 64), "b-portrait.png": (48, 120), "c-square.png": (64, 64)}.items():
        Image.new("RGB", size, (200, 30, 30)).save(folder / name)  # (width, height)
    opts = parse_options(DreamBoothOptions, [
        "--pretrained_model_name_or_path", str(tiny_models.sdxl), "--instance_data_dir", str(folder), "--instance_prompt",
        "a photo of sks", "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--train_batch_size", "3",
        "--max_train_steps", "1", "--lora_rank", "4", "--report_to", "none", "--num_heldout_samples", "0"])
    opts.check()
    task = DreamBoothTask(opts, make_accelerator(opts))
    seen = []
    task.c.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    task.prepare_data(0)
    with torch.no_grad():
        task.loss(task.model, 0, 0)
    rows = {tuple(row) for row in seen[0].tolist()}
    assert rows == {(64, 96, 0, 8, 32, 32), (120, 48, 24, 0, 32, 32), (64, 64, 0, 0, 32, 32)}, rows
    assert task.family.generation_kwargs() == {}  # validation: the pipeline's own, (32, 32) at 32 px
    assert "original_size" not in usage("lora", str(tiny_models.sdxl), tmp_path / "out", "a photo of sks", task.family)
    shards = FAMILIES["sdxl"]
    assert shards.generation_kwargs() == {"original_size": (256, 256), "crops_coords_top_left": (0, 0)}
    assert "original_size=(256, 256)" in usage("lora", str(tiny_models.sdxl), tmp_path / "out", "a sks", shards)
    for key, own in (("instance_data_dir", True), ("train_data_dir", True), ("shard_dir", False)):
        run = tmp_path / key
        run.mkdir()
        (run / "run_config.json").write_text(json.dumps({key: "somewhere"}))
        assert trained_on_own_images([str(tiny_models.sdxl), str(run)]) == own
