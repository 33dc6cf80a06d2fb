"""What a real cluster at full scale meets and a 1-process CPU run hides: collective timeouts, folders that are not
shared, resume on another number of processes, DeepSpeed settings, fp16 VAEs, srun's exit handling."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .helpers import DEEPSPEED_CONFIGS, REPO, launch, relative_difference, run_script, weights


@pytest.mark.parametrize("mode", ["timeout-train", "timeout-infer"])
def test_ddp_timeout_reaches_every_process_group(mode, tmp_path):
    """--ddp_timeout 3: a rank 90 s late at a barrier fails the job in seconds (torch's default would wait)."""
    start = time.time()
    proc = launch("tests/probes/collectives.py", mode, tmp_path, check=False, timeout=240)
    elapsed = time.time() - start
    assert proc.returncode != 0 and "barrier passed" not in proc.stdout, proc.stderr[-2000:]
    assert elapsed < 75, f"{elapsed:.0f} s: the timeout did not reach the process group"


def test_a_folder_that_is_not_shared_is_one_line_on_every_node(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out-rank1").mkdir()
    proc = launch("tests/probes/collectives.py", "shared", tmp_path / "out", check=False, timeout=120)
    assert proc.returncode != 0
    # the same line on every rank: said once per node (a node's 8 GPUs printed it 8 times), here one
    assert proc.stderr.count("is not shared: process(es) [1] do not see") == 1, proc.stderr[-2000:]
    same = launch("tests/probes/collectives.py", "shared", tmp_path / "out-rank1", check=False, timeout=120)
    assert same.returncode != 0  # rank 1 looks in out-rank1-rank1: not there either (the check is real)
    (tmp_path / "out-rank1-rank1").symlink_to(tmp_path / "out-rank1")
    assert launch("tests/probes/collectives.py", "shared", tmp_path / "out-rank1", check=False, timeout=120).returncode == 0


def test_max_grad_norm_zero_turns_deepspeeds_clipping_off():
    from sketch2real.training.accelerator import deepspeed_settings
    from sketch2real.training.options import TrainOptions

    settings = deepspeed_settings(TrainOptions(max_grad_norm=0.0, train_batch_size=3, gradient_accumulation_steps=2))
    assert settings == {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0}
    config = {"gradient_clipping": 1.0}  # what the shipped ZeRO configs say
    config.update(deepspeed_settings(TrainOptions(max_grad_norm=0.0)))
    assert config["gradient_clipping"] == 0.0


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)])
def test_resume_on_another_number_of_processes(before, after, tiny_models, shard_dir, tmp_path):
    """A DDP checkpoint of N processes resumes on M with the same global batch: the same learning rates (a cosine
    schedule) and the same batches from the resume step on, so the weights end as an uninterrupted run's."""
    args = ["--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir, "--instance_category", "cat",
            "--instance_prompt", "a sks sketch of a cat", "--resolution", "32", "--learning_rate", "1e-3",
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--lora_rank", "4", "--validation_steps", "0",
            "--report_to", "none", "--max_train_steps", "6", "--checkpointing_steps", "3", "--num_heldout_samples", "0"]

    def run(processes: int, out: Path, *extra):
        batch = str(2 // processes)
        if processes == 1:
            return run_script("train/dreambooth.py", *args, "--output_dir", out, "--train_batch_size", batch, *extra)
        return launch("train/dreambooth.py", *args, "--output_dir", out, "--train_batch_size", batch, *extra)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(before, straight)
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    proc = run(after, resumed, "--resume_from_checkpoint", "latest")
    assert "resumed from" in proc.stderr
    a, b = json.loads((straight / "metrics.json").read_text()), json.loads((resumed / "metrics.json").read_text())
    assert b["num_processes"] == after and b["steps_this_run"] == 3
    assert b["final_lr"] == a["final_lr"]
    base = {k: torch.zeros_like(v) for k, v in weights(straight).items()}  # LoRA's up matrices start at 0
    assert relative_difference(weights(straight), weights(resumed), base) < 1e-2


def test_a_deepspeed_checkpoint_on_another_world_size_is_refused_in_one_line(tmp_path):
    from sketch2real.training.checkpoints import MANIFEST, TRAIN_STATE, RunFingerprint, _decide_resume, launch_problem

    assert launch_problem({"num_processes": 2, "deepspeed": False}, {"num_processes": 4, "deepspeed": False}) == ""
    problem = launch_problem({"num_processes": 2, "deepspeed": True}, {"num_processes": 1, "deepspeed": True})
    assert "resume it on 2 processes" in problem
    assert "with DeepSpeed" in launch_problem({"num_processes": 2, "deepspeed": True}, {"num_processes": 2, "deepspeed": False})
    # another ZeRO stage or optimizer offload on a requeue: one line (tracebacks on every rank before: DeepSpeed's
    # checkpoint list assertion, CPU Adam's KeyError 'bias_correction' on torch AdamW's state)
    zero2 = {"num_processes": 2, "deepspeed": True, "zero_stage": 2, "offload_optimizer": "none"}
    assert "ZeRO stage 2 and this run has 3" in launch_problem(zero2, {**zero2, "zero_stage": 3})
    assert "optimizer offload none and this run has cpu" in launch_problem(zero2, {**zero2, "offload_optimizer": "cpu"})
    assert launch_problem({"num_processes": 2, "deepspeed": True}, zero2) == ""  # saved before they were recorded
    # ... whose files still tell ZeRO-3 from the others (a requeue of such a ZeRO-2 checkpoint under the ZeRO-3 config
    # was DeepSpeed's assertion on every rank)
    from sketch2real.training.checkpoints import DEEPSPEED_TAG, recorded_launch

    for name, files, stage, refused in (("z2", ["mp_rank_00_model_states.pt"], 3, "saved without ZeRO stage 3"),
                                        ("z3", ["zero_pp_rank_0_mp_rank_00_model_states.pt"], 2, "saved with ZeRO stage 3"),
                                        ("z2same", ["mp_rank_00_model_states.pt"], 2, "")):
        (tmp_path / name / DEEPSPEED_TAG).mkdir(parents=True)
        for file in files:
            (tmp_path / name / DEEPSPEED_TAG / file).write_bytes(b"")
        (tmp_path / name / TRAIN_STATE).write_text(json.dumps({"step": 2, "launch": {"num_processes": 2, "deepspeed": True}}))
        problem = launch_problem(recorded_launch(tmp_path / name), {**zero2, "zero_stage": stage})
        assert (refused in problem) if refused else problem == "", (name, problem)
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / TRAIN_STATE).write_text(json.dumps({"step": 5, "fingerprint": {"a": 1},
                                                  "launch": {"num_processes": 8, "deepspeed": True}}))
    (folder / MANIFEST).write_text(json.dumps({"step": 5, "files": {TRAIN_STATE: (folder / TRAIN_STATE).stat().st_size}}))
    path, error = _decide_resume(tmp_path, "latest", RunFingerprint({"a": 1}, {}), {"num_processes": 4, "deepspeed": True})
    assert path is None and "DeepSpeed ZeRO checkpoint of 8 processes" in error and "\n" not in error
    path, error = _decide_resume(tmp_path, "latest", RunFingerprint({"a": 1}, {}), {"num_processes": 8, "deepspeed": True})
    assert path == str(folder) and error is None
    # a DDP job requeued on fewer processes (slurm/common.sh keeps the per-process batch): the refusal names the
    # --train_batch_size that keeps the global batch (it said only "remove them to start over")
    (folder / TRAIN_STATE).write_text(json.dumps({"step": 5, "fingerprint": {"a": 1, "global_batch_size": 8}}))
    ddp = {"num_processes": 2, "deepspeed": False}
    _, error = _decide_resume(tmp_path, "latest", RunFingerprint({"a": 1, "global_batch_size": 2}, {}), ddp)
    assert "global_batch_size: 8 there, 2 now" in error and "on 2 process(es) --train_batch_size 4 keeps its global batch of 8" in error
    _, error = _decide_resume(tmp_path, "latest", RunFingerprint({"a": 1, "global_batch_size": 3}, {}), {**ddp, "num_processes": 3})
    assert "its global batch of 8 needs a number of processes that divides it" in error
    # a ZeRO checkpoint resumes on its own count only: no hint that leads to a second refusal
    (folder / TRAIN_STATE).write_text(json.dumps({"step": 5, "fingerprint": {"a": 1, "global_batch_size": 8},
                                                  "launch": {"num_processes": 8, "deepspeed": True}}))
    _, error = _decide_resume(tmp_path, "latest", RunFingerprint({"a": 1, "global_batch_size": 2}, {}),
                              {"num_processes": 2, "deepspeed": True})
    assert "it is a DeepSpeed ZeRO checkpoint of 8 processes: resume it on those" in error and "--train_batch_size" not in error
    # a cosine run given more steps: the refusal says why it is another run (it named the count only)
    (folder / TRAIN_STATE).write_text(json.dumps({"step": 5, "fingerprint": {"lr_scheduler": "cosine", "max_train_steps": 5}}))
    _, error = _decide_resume(tmp_path, "latest", RunFingerprint({"lr_scheduler": "cosine", "max_train_steps": 9}, {}), ddp)
    assert "max_train_steps: 5 there, 9 now): --lr_scheduler cosine spreads its learning rates over --max_train_steps" in error
    _, error = _decide_resume(tmp_path, "latest", RunFingerprint({"lr_scheduler": "constant"}, {}), ddp)
    assert "lr_scheduler: 'cosine' there, 'constant' now" in error and "spreads" not in error


def test_a_zero_checkpoint_requeued_on_another_count_is_refused_before_the_model_loads(tiny_models, shard_dir, tmp_path):
    """As a requeued job meets it: the refusal came after the model loaded and was prepared (minutes for FLUX)."""
    out = tmp_path / "zero2"
    args = ["train/dreambooth.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir,
            "--instance_category", "cat", "--resolution", "64", "--max_train_steps", "2", "--checkpointing_steps", "1",
            "--report_to", "none", "--validation_steps", "0", "--lora_rank", "4", "--output_dir", out]
    launch(*args, deepspeed_config=DEEPSPEED_CONFIGS["zero2"], accelerate_precision=None)
    # resubmitted as it finished, on 1 process with the same global batch: nothing to train (not refused)
    proc = launch(*args, "--resume_from_checkpoint", "latest", "--train_batch_size", "2", num_processes=1,
                  deepspeed_config=DEEPSPEED_CONFIGS["zero2"], accelerate_precision=None)
    assert "holds this run's trained model (2 steps" in proc.stdout
    proc = launch(*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", num_processes=1,
                  deepspeed_config=DEEPSPEED_CONFIGS["zero2"], accelerate_precision=None, check=False)
    said = [line for line in proc.stderr.splitlines() if "dreambooth.py: error:" in line]  # (torchrun's block follows)
    assert proc.returncode != 0 and len(said) == 1, proc.stderr[-3000:]
    assert "it is a DeepSpeed ZeRO checkpoint of 2 processes: resume it on those" in said[0]
    assert "Loading pipeline components" not in proc.stderr and "Loading weights" not in proc.stderr


@pytest.mark.parametrize("config, precision, message", [
    ({"gradient_clipping": 0.5}, None, "sets gradient_clipping 0.5, the trainer's --max_grad_norm is 1: give --max_grad_norm 0.5"),
    ({"gradient_accumulation_steps": 2}, None, "sets gradient_accumulation_steps 2, the trainer's --gradient_accumulation_steps is 1"),
    ({"train_micro_batch_size_per_gpu": 4}, None, "sets train_micro_batch_size_per_gpu 4, the trainer's --train_batch_size is 1"),
    ({"train_batch_size": 8}, None, "sets train_batch_size 8, the trainer's global batch is 2"),
    ({"train_batch_size": "8"}, None, "sets train_batch_size 8, the trainer's global batch is 2"),
    ({"optimizer": {"type": "AdamW"}}, None, 'has a block "optimizer": the trainer makes its own \\(--optimizer'),
    ({"scheduler": {"type": "WarmupLR"}}, None, 'has a block "scheduler": the trainer makes its own \\(--lr_scheduler'),
    ({"bf16": {"enabled": True}}, "no", "--mixed_precision no, but the DeepSpeed config .* enables bf16"),
    ({"bf16": {"enabled": False}}, "bf16", "--mixed_precision bf16, but the DeepSpeed config .* turns bf16 off"),
    ({"fp16": {"enabled": "true"}}, "bf16", "--mixed_precision bf16, but the DeepSpeed config .* enables fp16"),
])
def test_a_deepspeed_config_saying_otherwise_than_the_flags_is_one_line(config, precision, message, tmp_path):
    """A user's DeepSpeed JSON (accelerate's deepspeed_config_file): its values were silently replaced by the flags'
    (clipping 0.5 trained as 1.0), its optimizer block was a traceback, its scheduler ran beside the trainer's, bf16
    turned off there trained fp32 under --mixed_precision bf16, fp16 there was accelerate's traceback."""
    from sketch2real.cli import UserError
    from sketch2real.training.accelerator import check_deepspeed_config

    settings = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    path = tmp_path / "ds.json"
    env = {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path), "ACCELERATE_MIXED_PRECISION": "no"}
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **config}))
    with pytest.raises(UserError, match=message):
        check_deepspeed_config(env, settings, settings, precision, 2)
    # "auto", null, the same values, or the precision left to the config: taken
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto", "gradient_clipping": 1,
                                "bf16": {"enabled": True}, "gradient_accumulation_steps": None}))
    for precision in (None, "bf16"):
        check_deepspeed_config(env, settings, settings, precision, 2)
    # the accelerate YAML's own deepspeed_config values: edited away from the shipped ones (the options' defaults)
    # and not given as flags, one line; the shipped ones under other flags (--max_grad_norm 0): the flags'
    yaml = {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2", "ACCELERATE_GRADIENT_CLIPPING": "1.0"}
    with pytest.raises(UserError, match="the accelerate config sets deepspeed_config gradient_accumulation_steps 2, "
                                        "the trainer's --gradient_accumulation_steps is 1: give --gradient_accumulation_steps 2"):
        check_deepspeed_config(yaml, settings, settings, None, 2)
    check_deepspeed_config(yaml, {**settings, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0}, settings, None, 2)


def test_a_users_deepspeed_clipping_is_one_line_once_per_node_under_accelerate_launch(tiny_models, shard_dir, tmp_path):
    """As a user launches it: accelerate's deepspeed_config_file pointing at their JSON, 2 processes on a node."""
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                                                  "gradient_clipping": 0.5}))
    config = (REPO / "tests/configs/zero3_partitioned.yaml").read_text()
    (tmp_path / "ds.yaml").write_text(config.replace("tests/configs/zero3_partitioned.json", str(tmp_path / "ds.json")))
    proc = launch("train/dreambooth.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir,
                  "--instance_category", "cat", "--resolution", "64", "--max_train_steps", "1", "--report_to", "none",
                  "--output_dir", tmp_path / "out", deepspeed_config=str(tmp_path / "ds.yaml"), accelerate_precision=None,
                  check=False)
    assert proc.returncode != 0 and not (tmp_path / "out" / "metrics.json").exists()
    assert proc.stderr.count("sets gradient_clipping 0.5, the trainer's --max_grad_norm is 1: give --max_grad_norm 0.5") == 1


def test_the_vae_stays_fp32_under_fp16_unless_it_is_fp16_safe():
    from types import SimpleNamespace

    from sketch2real.training.task import vae_dtype

    sdxl, fixed, old = (SimpleNamespace(config=SimpleNamespace(force_upcast=True)),
                        SimpleNamespace(config=SimpleNamespace(force_upcast=False)), SimpleNamespace(config=SimpleNamespace()))
    assert vae_dtype(sdxl, torch.float16) == torch.float32 and vae_dtype(old, torch.float16) == torch.float32
    assert vae_dtype(fixed, torch.float16) == torch.float16
    assert vae_dtype(sdxl, torch.bfloat16) == torch.bfloat16 and vae_dtype(sdxl, torch.float32) == torch.float32


@pytest.mark.parametrize("autocast", ["fp16 on one process", "off: DeepSpeed's fp16"])
def test_validation_decodes_in_the_fp32_vae_s_own_dtype_under_fp16(autocast, tiny_models, tmp_path):
    """Under fp16 SDXL's own VAE sits in fp32 (its activations pass fp16's 65504). Validation's autocast ran its
    convolutions in fp16 anyway: black (NaN) images. Under DeepSpeed, whose autocast is off, the fp16 denoiser's
    latents met the fp32 weights: a crash at the first validation, and the run's end lost with it."""
    import contextlib
    from types import SimpleNamespace

    import numpy as np

    from sketch2real.models import assemble_pipeline, load_sd_components
    from sketch2real.training.task import DiffusionTask, vae_dtype
    from sketch2real.training.validation import generate_rows

    c = load_sd_components(tiny_models.sdxl, frozen_dtype=torch.float16)
    c.vae.to(vae_dtype(c.vae, torch.float16))
    with torch.no_grad():  # SDXL's VAE's range: decoder activations past fp16's (its GroupNorms take the scale out)
        c.vae.decoder.conv_in.weight.mul_(1e4)
        c.vae.decoder.conv_in.bias.mul_(1e4)
    pipe = assemble_pipeline(c, c.denoiser, c.text_encoder, c.family.validation_scheduler(c.noise_scheduler))
    found = {}

    def validation_images(model, between):
        rows = generate_rows(pipe, ["a sketch of a cat"], 1, 0, 64, 2, c.family.pipeline_call_defaults())
        return rows, rows[0], [None]

    task = SimpleNamespace(opts=SimpleNamespace(num_validation_images=1, resolution=64, output_dir=tmp_path), heldout=None,
                           c=c, resident_text_encoders=contextlib.nullcontext, validation_images=validation_images,
                           style_scores=lambda images, categories: found.update(image=np.asarray(images[0])) or {})
    on_one_process = autocast.startswith("fp16")
    if not on_one_process:
        c.denoiser.to(torch.float16)  # what DeepSpeed makes of the prepared model
    accelerator = SimpleNamespace(
        num_processes=1, is_main_process=True, trackers=[], state=SimpleNamespace(deepspeed_plugin=None),
        unwrap_model=lambda m: m,
        autocast=lambda: torch.autocast("cpu", dtype=torch.float16) if on_one_process else contextlib.nullcontext())
    DiffusionTask.validate(task, accelerator, c.denoiser, step=1)
    assert found["image"].std() > 1, "a black (NaN) validation image"
    assert (tmp_path / "validation" / "step-000001.png").is_file()
    assert c.vae.decode.__func__ is type(c.vae).decode  # the VAE's own method again after validation


def test_a_non_finite_posterior_is_one_line_naming_the_image(tiny_models, shard_dir, tmp_path):
    """A VAE that overflows (here: NaN weights) stops the run before the cache, naming the image; not a NaN loss
    at step 1 that a resume meets again."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "broken-vae-model"
    shutil.copytree(tiny_models.sd, model)
    file = next((model / "vae").glob("*.safetensors"))
    state = load_file(file)
    name = next(k for k in state if k.startswith("encoder.conv_in.weight"))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, file)
    proc = run_script("train/dreambooth.py", "--pretrained_model_name_or_path", model, "--shard_dir", shard_dir,
                      "--instance_category", "cat", "--resolution", "32", "--max_train_steps", "2", "--report_to", "none",
                      "--validation_steps", "0", "--num_heldout_samples", "0", "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"the VAE gives a non-finite latent for \S*cat/", proc.stderr)  # shard:key of the image
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "metrics.json").exists()


def test_trained_weights_are_copied_on_rank_zero_only():
    from types import SimpleNamespace

    from sketch2real.training.accelerator import trained_state_dict

    module = torch.nn.Linear(3, 2)

    def accelerator(main: bool):
        return SimpleNamespace(is_main_process=main, unwrap_model=lambda m: m, state=SimpleNamespace(deepspeed_plugin=None))

    assert trained_state_dict(accelerator(False), module) == {}
    copy = trained_state_dict(accelerator(True), module)
    assert set(copy) == {"weight", "bias"} and torch.equal(copy["weight"], module.weight.detach())


@pytest.mark.parametrize("launcher_status, preempted, srun_sees", [(1, True, 1), (137, True, 137), (75, True, 0),
                                                                     (1, False, 1), (3, False, 3), (0, False, 0)])
def test_a_preempted_node_does_not_make_srun_kill_the_others(launcher_status, preempted, srun_sees, tmp_path):
    """slurm/launch_node.sh reports a preempted launcher (75: its ranks stopped on a signal and left PREEMPTED) as
    success to srun, whose --kill-on-bad-exit would otherwise kill the other nodes' tasks; other failures pass
    through, also beside a PREEMPTED that ranks stopped by torchrun after a crash left (it was success: requeued)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    out = tmp_path / "run"
    launcher = fake / "python3"  # the interpreter that runs accelerate's launcher, exiting as it does
    launcher.write_text(f"#!/bin/sh\n{'touch ' + str(out / 'PREEMPTED') if preempted else 'true'}\nexit {launcher_status}\n")
    launcher.chmod(0o755)
    out.mkdir()
    proc = subprocess.run(["bash", str(REPO / "slurm/launch_node.sh"), "train/dreambooth.py", "--output_dir", "elsewhere",
                           f"--output_dir={out}"], cwd=REPO,
                          env={**os.environ, "PYTHON": str(launcher), "ACCELERATE_CONFIG": "x.yaml"})
    assert proc.returncode == srun_sees



def test_torchrun_gives_ranks_stopped_by_slurm_s_sigterm_the_time_their_checkpoint_takes(tmp_path):
    """torchrun's agent, given Slurm's SIGTERM, SIGKILLs its ranks 30 s after forwarding it
    (TORCH_ELASTIC_SHUTDOWN_TIMEOUT): a checkpoint that took longer was cut mid-write and the job failed (143, no
    requeue; measured on the two-node cluster with a 40 s save). launch_node.sh leaves the limit to Slurm."""
    fake = tmp_path / "python3"
    fake.write_text(f"#!/bin/sh\necho $TORCH_ELASTIC_SHUTDOWN_TIMEOUT > {tmp_path}/timeout\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
    subprocess.run(["bash", str(REPO / "slurm/launch_node.sh"), "train/dreambooth.py"], cwd=REPO, check=True,
                   env={**env, "PYTHON": str(fake), "ACCELERATE_CONFIG": "x.yaml"})
    assert int((tmp_path / "timeout").read_text()) >= 600

RANK_EXITS = """import os, signal, sys, time
rank = int(os.environ.get("RANK", 0))
what = sys.argv[1].split(",")[rank]
if what == "ctrlc":  # a script under cli.run_main: Ctrl-C is one line and 130
    def interrupted(signum, frame):
        print("ranks.py: interrupted", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGINT, interrupted)
    open(f"{sys.argv[0]}.{rank}.started", "w").close()
    time.sleep(600)
if what == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if what == "term75":  # a trainer: SIGTERM is a preemption, PREEMPTED in --output_dir and 75
    def stop(signum, frame):
        open(os.path.join(sys.argv[3], "PREEMPTED"), "w").close()
        sys.exit(75)
    signal.signal(signal.SIGTERM, stop)
    open(f"{sys.argv[0]}.{rank}.started", "w").close()
    time.sleep(600)
if what == "crash":  # once the other rank runs: a crash of its own (a full disk, CUDA out of memory)
    while not os.path.exists(f"{sys.argv[0]}.{1 - rank}.started"):
        time.sleep(0.05)
    sys.exit(1)
if what == "wait":  # until torchrun's agent ends it (SIGTERM), after the other rank failed or the agent was signalled
    open(f"{sys.argv[0]}.{rank}.started", "w").close()
    time.sleep(600)
sys.exit(int(what))
"""


def _launch_ranks(tmp_path: Path, ranks: str, run=subprocess.run, **kwargs):
    """`python -m sketch2real.launcher` (real torchrun, 2 CPU ranks, a free port) of `RANK_EXITS` with `ranks`, and
    `--output_dir tmp_path`."""
    import socket

    script = tmp_path / "ranks.py"
    script.write_text(RANK_EXITS)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return run([sys.executable, "-m", "sketch2real.launcher", "--config_file", str(REPO / "accelerate_configs/cpu.yaml"),
                "--num_processes", "2", "--main_process_port", str(port), str(script), ranks, "--output_dir",
                str(tmp_path)], text=True,
               env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


@pytest.mark.parametrize("ranks, status, line", [
    ("2,2", 2, None), ("75,75", 75, None), ("wait,kill", 137, "rank 1 on {host} was killed by SIGKILL"),
    ("3,wait", 3, "rank 0 on {host} exited with status 3 (its error is above)")])
def test_the_jobs_launcher_ends_with_the_ranks_own_status_and_no_torchrun_traceback(ranks, status, line, tmp_path):
    """What slurm/launch_node.sh runs (real torchrun, two ranks): the job's status is the trainers' own (2: a bad
    input, as a job's README claims; 75: preempted), not accelerate's 1, and torchrun's ~30-line ChildFailedError
    traceback is gone: a rank that died without its own line (a signal, a crash) is named in one line."""
    import socket

    proc = _launch_ranks(tmp_path, ranks, capture_output=True, timeout=300)
    assert proc.returncode == status and "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, \
        proc.stderr[-3000:]
    ours = [x for x in proc.stderr.splitlines() if x.startswith("launcher: error: ")]
    assert ours == ([f"launcher: error: {line.format(host=socket.gethostname())}" + (
        " (often the out-of-memory killer)" if "SIGKILL" in line else "")] if line else []), proc.stderr[-3000:]


def _signal_launched_ranks(tmp_path: Path, ranks: str, signum: int) -> tuple[int, str]:
    """`_launch_ranks`, then `signum` to the launcher once both ranks run: (its status, its stderr)."""
    for started in [tmp_path / f"ranks.py.{rank}.started" for rank in (0, 1)]:
        started.unlink(missing_ok=True)
    proc = _launch_ranks(tmp_path, ranks, run=subprocess.Popen, stderr=subprocess.PIPE)
    while not all((tmp_path / f"ranks.py.{rank}.started").exists() for rank in (0, 1)) and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=120)[1]
    return proc.returncode, stderr


def test_a_signalled_launcher_ends_in_one_line_with_the_signal_s_status(tmp_path):
    """SIGTERM to the launcher (scancel, a node's shutdown): torchrun's agent stops the ranks with it; the launcher ends
    with 128 + 15 and one line, not torchrun's SignalException traceback and status 1."""
    status, stderr = _signal_launched_ranks(tmp_path, "wait,wait", signal.SIGTERM)
    assert status == 143 and "Traceback" not in stderr, stderr[-3000:]
    assert "launcher: error: " not in stderr and "launcher: stopped by SIGTERM: so were the ranks" in stderr
    # trainers that took the signal for a preemption (Slurm's SIGTERM) and left PREEMPTED: the job is preempted
    status, stderr = _signal_launched_ranks(tmp_path, "term75,term75", signal.SIGTERM)
    assert status == 75 and f"they saved their work: {tmp_path}/PREEMPTED" in stderr, stderr[-3000:]
    # Ctrl-C stops the ranks at once, saving nothing: 130, and the PREEMPTED an earlier job left is not this one's
    # (it was exit 75, a requeue, "they saved their work")
    status, stderr = _signal_launched_ranks(tmp_path, "wait,wait", signal.SIGINT)
    assert status == 130 and "launcher: stopped by SIGINT: so were the ranks" in stderr, stderr[-3000:]
    assert "saved their work" not in stderr and (tmp_path / "PREEMPTED").is_file()


@pytest.mark.parametrize("accelerate_version", ["1.15", "1.16"])
def test_the_launcher_reads_a_signalled_agent_as_accelerate_1_15_and_1_16_end_it(accelerate_version, tmp_path,
                                                                                  monkeypatch, capsys):
    """accelerate 1.16 ends a signalled torchrun agent itself (exit 128 + the signal) and a Ctrl-C before any rank
    started (exit 130), where 1.15 raised them to the launcher: a preempted job exited 143 and was not requeued. Both
    give the same line and status (accelerate's launch_command stands in, as each version ends)."""
    import signal as signals

    import accelerate.commands.launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from sketch2real import launcher

    monkeypatch.setattr(signals, "signal", lambda *args: None)  # the launcher's handlers: not the test process's
    monkeypatch.setattr(accelerate_launch, "simple_launcher", accelerate_launch.simple_launcher)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(sys, "argv", ["launcher", "--cpu", "--num_processes", "2", "train.py", "--output_dir", str(out)])

    def ends(error: BaseException, saved: bool) -> tuple[int, str]:
        def launch_command(args):
            if saved:  # by the ranks, after the launcher started (a file's time can trail the clock by a tick)
                (out / "PREEMPTED").touch()
                os.utime(out / "PREEMPTED", (time.time() + 1, time.time() + 1))
            if accelerate_version == "1.15":
                raise error
            try:  # accelerate 1.16's _run_torchrun
                raise error
            except KeyboardInterrupt:
                sys.exit(130)
            except SignalException as signalled:
                sys.exit(128 + signalled.sigval)

        monkeypatch.setattr(accelerate_launch, "launch_command", launch_command)
        with pytest.raises(SystemExit) as stop:
            launcher.main()
        return stop.value.code, capsys.readouterr().err.strip()

    code, said = ends(SignalException("", signals.SIGTERM), saved=True)
    assert code == 75 and said == f"launcher: stopped by SIGTERM: so were the ranks (they saved their work: {out}/PREEMPTED)"
    (out / "PREEMPTED").unlink()
    assert ends(SignalException("", signals.SIGTERM), saved=False) == (143, "launcher: stopped by SIGTERM: so were the ranks")
    assert ends(SignalException("", signals.SIGINT), saved=False) == (130, "launcher: stopped by SIGINT: so were the ranks")
    assert ends(KeyboardInterrupt(), saved=False) == (130, "launcher: interrupted")


def test_ctrl_c_to_a_one_process_launcher_ends_with_the_script_s_line_and_status(tmp_path):
    """A terminal's Ctrl-C reaches the launcher and its one process alike: the launcher ended at once in a
    KeyboardInterrupt traceback of its own (exit 1), before the script had stopped; it waits for the script's 130."""
    script = tmp_path / "ranks.py"
    script.write_text(RANK_EXITS)
    proc = subprocess.Popen([sys.executable, "-m", "sketch2real.launcher", "--cpu", "--num_processes", "1", str(script),
                             "ctrlc", "--output_dir", str(tmp_path)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    while not (tmp_path / "ranks.py.0.started").exists() and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # the whole foreground group, as a terminal sends it
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "ranks.py: interrupted" and "launcher: interrupted" not in stderr


def test_a_rank_s_crash_fails_the_job_where_the_ranks_torchrun_stopped_after_it_left_preempted(tmp_path):
    """Rank 1 crashes (a full disk, out of memory); torchrun stops rank 0 with SIGTERM, which a trainer takes for
    Slurm's and leaves PREEMPTED. The job was reported a success and requeued, to crash again without end: it
    now fails with the crash's status, and the PREEMPTED left is not a requeue."""
    proc = _launch_ranks(tmp_path, "term75,crash", capture_output=True, timeout=300)
    assert (tmp_path / "PREEMPTED").is_file()  # the case: rank 0 stopped as if preempted
    assert proc.returncode == 1, proc.stderr[-3000:]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.calls\n")
    (fake / "scontrol").chmod(0o755)
    finish = subprocess.run(["bash", "-c", f'source slurm/common.sh; s2r_finish {tmp_path} 1'], cwd=REPO, text=True,
                            capture_output=True, env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}",
                                                      "SLURM_JOB_ID": "4242", "MASTER_ADDR": "localhost",
                                                      "MASTER_PORT": "29500"})
    assert finish.returncode == 1 and "not requeued" in finish.stdout, finish.stdout + finish.stderr
    calls = (tmp_path / "scontrol.calls").read_text() if (tmp_path / "scontrol.calls").exists() else ""
    assert "requeue" not in calls and not (tmp_path / "PREEMPTED").exists()


def test_the_latent_store_is_encoded_once_kept_through_a_signal_and_reused(tiny_models, shard_dir, tmp_path, monkeypatch):
    """A signal mid-encoding keeps the finished blocks; the next build encodes only the rest and ends with blocks
    byte-identical to one uninterrupted build; a third build (a later run) encodes nothing; latents read back
    equal the VAE's posterior to fp16 precision."""
    from types import SimpleNamespace

    from sketch2real.models import load_sd_components
    from sketch2real.shards import ShardSamples
    from sketch2real.training.data import LazyImages
    from sketch2real.training.diffusion import encode_latents
    from sketch2real.training.latent_store import LatentStore
    from sketch2real.training.preemption import Preempted, preemption

    vae = load_sd_components(str(tiny_models.sd)).vae
    samples = ShardSamples(shard_dir, "train", fields=("photo",), resolution=32)
    images = LazyImages(samples, "photo", list(range(len(samples))))
    assert len(images) > 48
    solo = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, wait_for_everyone=lambda: None)
    everything = list(range(len(images)))

    straight = LatentStore(tmp_path / "straight", vae, images, torch.device("cpu"), block=16)
    straight.build(solo, everything, 0, False, False)
    assert straight.stats["blocks_encoded_here"] == -(-len(images) // 16)

    calls = {"n": 0}

    def check_after_five(accelerator=None):
        calls["n"] += 1
        if calls["n"] > 5:
            raise Preempted("signal")

    store = LatentStore(tmp_path / "cut", vae, images, torch.device("cpu"), block=16)
    monkeypatch.setattr(preemption, "check", check_after_five)
    with pytest.raises(Preempted):
        store.build(solo, everything, 0, False, False)
    monkeypatch.undo()
    kept = {p.name: p.stat().st_mtime_ns for p in store.folder.glob("block-*.npy")}
    assert len(kept) == 2  # chunks 0-3 made blocks 0 and 1; chunk 4 was in block 2 when the signal came
    again = LatentStore(tmp_path / "cut", vae, images, torch.device("cpu"), block=16)
    again.build(solo, everything, 0, False, False)
    assert again.stats["blocks_reused"] == 2 and again.stats["blocks_encoded_here"] == straight.stats["blocks_encoded_here"] - 2
    assert all(p.stat().st_mtime_ns == kept[p.name] for p in again.folder.glob("block-*.npy") if p.name in kept)
    for a, b in zip(sorted(straight.folder.glob("block-*.npy")), sorted(again.folder.glob("block-*.npy"))):
        assert a.read_bytes() == b.read_bytes()
    later = LatentStore(tmp_path / "cut", vae, images, torch.device("cpu"), block=16)
    later.build(solo, everything, 0, False, False)
    assert later.stats["blocks_encoded_here"] == 0 and later.folder == again.folder

    with torch.no_grad():
        shape = vae.encode(images[[0]]).latent_dist.mean.shape[1:]
    eps = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    expected = encode_latents(vae, images[[0, 17, 40]], eps)
    assert torch.allclose(later.latents([0, 17, 40], eps), expected, rtol=2e-3, atol=2e-3)
    other_vae = load_sd_components(str(tiny_models.sd)).vae
    with torch.no_grad():
        next(other_vae.parameters()).add_(1.0)
    assert LatentStore(tmp_path / "cut", other_vae, images, torch.device("cpu"), block=16).folder != later.folder
    # the shards copied to another folder (a node's local disk) with new times: the same store (a requeue encoded it
    # all again; ranks with their own copies wrote and read blocks in different folders, and crashed)
    import shutil

    shutil.copytree(shard_dir, tmp_path / "copy")
    copied = ShardSamples(tmp_path / "copy", "train", fields=("photo",), resolution=32)
    copied_images = LazyImages(copied, "photo", list(range(len(copied))))
    assert LatentStore(tmp_path / "cut", vae, copied_images, torch.device("cpu"), block=16).folder == later.folder
    # pixels made by another decoder (a Pillow whose resampling changed, our resize changed): not these latents
    import sketch2real.training.data

    monkeypatch.setattr(sketch2real.training.data, "DECODER_VERSION", "2|Pillow 99", raising=False)
    assert LatentStore(tmp_path / "cut", vae, images, torch.device("cpu"), block=16).folder != later.folder


def test_a_latent_store_that_will_not_fit_its_disk_stops_before_encoding(tiny_models, shard_dir, tmp_path, monkeypatch):
    """The store's size (2 x latent channels x side^2 x 2 bytes an image) against the disk's free space, before any
    image is encoded: 13 GiB for a style over Sketchy's sketches at 1024 px found a full disk at its end."""
    import shutil
    from collections import namedtuple
    from types import SimpleNamespace

    from sketch2real.cli import UserError
    from sketch2real.models import load_sd_components
    from sketch2real.shards import ShardSamples
    from sketch2real.training.data import LazyImages
    from sketch2real.training.latent_store import LatentStore

    vae = load_sd_components(str(tiny_models.sd)).vae
    samples = ShardSamples(shard_dir, "train", fields=("photo",), resolution=32)
    images = LazyImages(samples, "photo", list(range(len(samples))))
    solo = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, wait_for_everyone=lambda: None)
    side = 32 // 2 ** (len(vae.config.block_out_channels) - 1)
    needed = len(images) * 2 * vae.config.latent_channels * side * side * 2
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(2**40, 0, needed - 1))
    store = LatentStore(tmp_path, vae, images, torch.device("cpu"), block=16)
    with pytest.raises(UserError, match=f"the latent store of {len(images)} images needs .* --latent_cache_dir"):
        store.build(solo, list(range(len(images))), 0, False, False)
    assert not list(store.folder.glob("block-*"))
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(2**40, 0, needed))
    store.build(solo, list(range(len(images))), 0, False, False)
    assert store.stats["blocks_encoded_here"] == -(-len(images) // 16)


SIGNALLED_THEN = """import os, signal, sys, time
from sketch2real.cli import run_main
from sketch2real.training.preemption import preemption

def main():
    preemption.install()
    if sys.argv[1] == "signal":
        os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning reached this rank
    raise RuntimeError("Connection closed by peer")  # then the barrier the stopped ranks left broke

run_main(main)
"""


@pytest.mark.parametrize("signalled", [True, False])
def test_a_rank_that_fails_after_a_preemption_signal_stops_as_preempted(signalled, tmp_path):
    """On two nodes, a node whose ranks had finished their share of a phase waits in its barrier when Slurm's signal
    comes; the other node's ranks stop (75) and the barrier breaks: that rank's failure (1) failed the preempted
    job. After a signal it is a preemption (PREEMPTED, 75); before any, a failure as before."""
    script, out = tmp_path / "rank.py", tmp_path / "run"
    script.write_text(SIGNALLED_THEN)
    proc = subprocess.run([sys.executable, str(script), "signal" if signalled else "none", "--output_dir", str(out)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if signalled:
        assert proc.returncode == 75 and (out / "PREEMPTED").is_file(), proc.stderr[-2000:]
        assert "stopped on a preemption signal (RuntimeError after it: Connection closed by peer)" in proc.stderr
    else:
        assert proc.returncode == 1 and "Traceback" in proc.stderr and not out.exists()


@pytest.mark.parametrize("config", ["torchrun", "simple"])
def test_sigterm_to_every_process_of_the_step_leaves_the_launcher_s_status_to_srun(config, tmp_path):
    """Slurm's SIGTERM at a preemption reaches every process of the step: slurm/launch_node.sh's shell died of it
    (srun saw 143, no requeue) while its trainers still saved; the one-process launcher (accelerate's simple one, for
    a config without distribution) died too. Both now wait, and the trainer's 75 reaches srun as success."""
    accelerate_config = REPO / "accelerate_configs/cpu.yaml"  # torchrun's agent, also for one process
    if config == "simple":
        accelerate_config = tmp_path / "one.yaml"
        accelerate_config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nuse_cpu: true\n"
                                     "num_machines: 1\nnum_processes: 1\nmixed_precision: 'no'\n")
    script, out = tmp_path / "trainer.py", tmp_path / "run"
    out.mkdir()
    script.write_text("import os, signal, sys, time\n"
                      "def stop(signum, frame):\n"
                      "    time.sleep(1)  # saving its checkpoint\n"
                      f"    open({str(out / 'PREEMPTED')!r}, 'w').close()\n"
                      "    sys.exit(75)\n"
                      "signal.signal(signal.SIGTERM, stop)\n"
                      f"open({str(tmp_path / 'started')!r}, 'w').close()\n"
                      "time.sleep(600)\n")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(["bash", str(REPO / "slurm/launch_node.sh"), str(script), "--output_dir", str(out)], cwd=REPO,
                            env={**os.environ, "ACCELERATE_CONFIG": str(accelerate_config),
                                 "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
                            start_new_session=True, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "started").exists() and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # as slurmstepd signals the step: every process of it
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0 and (out / "PREEMPTED").is_file(), stderr[-3000:]


def test_the_stores_keep_a_bounded_number_of_block_files_open(tmp_path):
    """Every block file read stayed memory-mapped, one descriptor each, for the run: a style LoRA over all of Sketchy
    (~850 latent blocks, ~200 caption blocks) died with "Too many open files" under the usual limit of 1,024."""
    import numpy as np

    from sketch2real.training.latent_store import MappedFiles

    for block in range(12):
        np.save(tmp_path / f"block-{block}.npy", np.full((4, 2), block, dtype=np.float16))
    blocks = MappedFiles(limit=3)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        for block in range(12):
            assert blocks(block, tmp_path / f"block-{block}.npy")[1, 0] == block
    assert len(os.listdir("/proc/self/fd")) - before <= 3 and list(blocks.open) == [9, 10, 11]
