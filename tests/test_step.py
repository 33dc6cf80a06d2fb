"""The training step as a GPU needs it, checked on CPU: it never reads a device value back to the host except once per
logging interval, and --torch_compile trains as eager does, compiles nothing after warm-up, and resumes exactly."""

from __future__ import annotations

import json
import shutil

import pytest

from .helpers import REPO, relative_difference, run_script, weights

PROBE = {"PYTHONPATH": str(REPO / "tests/probes/host_reads"),
         # not counted: the batch sampler's permutations, drawn on the CPU and never leaving it (a list per epoch), and
         # the latent cache's build before the first step (one-off, its reads follow the images it encodes)
         "S2R_PROBE_HOST_READS_IGNORE": "GlobalBatchSampler.,DiffusionTask.prepare_data"}
TRAINERS = {
    "dreambooth": ("train/dreambooth.py", ["--instance_category", "cat", "--instance_prompt", "a sks sketch of a cat"]),
    "textual_inversion": ("train/textual_inversion.py", []),
    "controlnet": ("train/controlnet.py", []),
}


def _common(tiny_models, shard_dir) -> list:
    return ["--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir, "--resolution", "64",
            "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none", "--num_heldout_samples", "0"]


def _host_reads(script: str, args: list, out, steps: int, logging_steps: int) -> dict:
    """The probe's count of a run."""
    env = {**PROBE, "S2R_PROBE_HOST_READS": str(out) + ".reads.json"}
    run_script(script, *args, "--output_dir", out, "--max_train_steps", steps, "--logging_steps", logging_steps,
               "--train_batch_size", 2, env=env)
    counted = json.loads((out.parent / (out.name + ".reads.json")).read_text())
    assert json.loads((out / "metrics.json").read_text())["host_reads"] == -(-steps // logging_steps)
    return counted


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_the_step_reads_device_values_only_once_per_logging_interval(trainer, tiny_models, shard_dir, tmp_path):
    script, extra = TRAINERS[trainer]
    args = [*_common(tiny_models, shard_dir), *extra]
    # one logging interval of 2 steps, then one of 6: as many reads (the interval's one included)
    short = _host_reads(script, args, tmp_path / "short", 2, 2)
    long = _host_reads(script, args, tmp_path / "long", 6, 6)
    assert long["reads"] == short["reads"], (short["sites"], long["sites"])
    if trainer == "dreambooth":  # the count sees the loop's reads: every step's read is 5 more
        every_step = _host_reads(script, args, tmp_path / "every", 6, 1)
        assert every_step["reads"] == long["reads"] + 5, (long["sites"], every_step["sites"])


def test_a_non_finite_loss_is_named_by_its_step_at_the_next_read(tiny_models, shard_dir, tmp_path):
    # The loss turns infinite at step 1; the loop reads it back at step 4 (--logging_steps 4) and stops there.
    script, extra = TRAINERS["dreambooth"]
    proc = run_script(script, *_common(tiny_models, shard_dir), *extra, "--output_dir", tmp_path, "--max_train_steps", 8,
                      "--logging_steps", 4, "--noise_offset", "1e39", check=False)
    assert proc.returncode == 1
    assert "loss is not finite at step 1: stopping at step 4" in proc.stderr


def _compiled_args(tiny_models, shard_dir) -> list:
    """DreamBooth in bf16 with a checkpoint at step 3 and a validation at step 4 (held-out loss and an image) between
    compiled steps; the loss read every 2 steps."""
    return [*_common(tiny_models, shard_dir), *TRAINERS["dreambooth"][1], "--mixed_precision", "bf16",
            "--max_train_steps", 6, "--logging_steps", 2, "--checkpointing_steps", 3, "--validation_steps", 4,
            "--num_heldout_samples", 2, "--validation_prompt", "a sks sketch of a cat", "--num_validation_images", 1,
            "--validation_inference_steps", 2, "--train_batch_size", 2, "--learning_rate", "1e-3"]


def test_torch_compile_trains_as_eager_compiles_nothing_after_warm_up_and_resumes_exactly(tiny_models, shard_dir,
                                                                                        tmp_path):
    args = _compiled_args(tiny_models, shard_dir)
    eager, fp32, compiled, resumed = (tmp_path / name for name in ("eager", "fp32", "compiled", "resumed"))
    run_script("train/dreambooth.py", *args, "--output_dir", eager)
    run_script("train/dreambooth.py", *args, "--output_dir", fp32, "--mixed_precision", "no")
    # Inductor's CPU kernels in scalar C++: a GPU runs Triton's, and vectorized C++ takes a fifth longer to compile here.
    scalar_cpu_kernels = {"TORCHINDUCTOR_VEC_ISA_OK": "0"}
    run_script("train/dreambooth.py", *args, "--output_dir", compiled, "--torch_compile", env=scalar_cpu_kernels)
    e, c = (json.loads((d / "metrics.json").read_text()) for d in (eager, compiled))
    assert c["compiled_graphs"] > 0 and e["compiled_graphs"] == 0
    # the step, the checkpoint at 3 and the validation at 4 compile nothing after the first read (step 2)
    assert c["steady_from_step"] == 2 and c["graphs_compiled_after_first_read"] == 0
    # Compiled kernels round bf16 differently, not the training: the compiled run is as close to full precision as
    # eager bf16 is (bf16's own noise on this run: eager bf16 against fp32), and not the same bytes as eager.
    base, full = weights(tiny_models.sd / "unet"), weights(fp32 / "unet")
    bf16_noise = relative_difference(weights(eager / "unet"), full, base)
    compiled_noise = relative_difference(weights(compiled / "unet"), full, base)
    assert compiled_noise <= 1.5 * bf16_noise, (compiled_noise, bf16_noise)
    assert relative_difference(weights(compiled / "unet"), weights(eager / "unet"), base) > 0
    assert c["final_loss"] == pytest.approx(e["final_loss"], rel=0.05)
    # Resumed from the compiled run's checkpoint, compiled again: bit-identical to the run never interrupted.
    resumed.mkdir()
    shutil.copytree(compiled / "checkpoint-3", resumed / "checkpoint-3")
    run_script("train/dreambooth.py", *args, "--output_dir", resumed, "--torch_compile", "--resume_from_checkpoint",
               "latest", env=scalar_cpu_kernels)
    a, b = weights(compiled / "unet"), weights(resumed / "unet")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert json.loads((resumed / "metrics.json").read_text())["steps_this_run"] == 3


COMPILED = {  # trainer: (script, extra flags, model)
    "textual_inversion": (*TRAINERS["textual_inversion"], "sd"),
    "controlnet": (*TRAINERS["controlnet"], "sd"),
    "dreambooth LoRA": (TRAINERS["dreambooth"][0], [*TRAINERS["dreambooth"][1], "--lora_rank", 4], "sd"),
    # FLUX.1 compiles block by block (its family's regions), here with gradient checkpointing
    "FLUX.1 dreambooth LoRA": (TRAINERS["dreambooth"][0], [*TRAINERS["dreambooth"][1], "--lora_rank", 4,
                                                          "--gradient_checkpointing"], "flux"),
}


@pytest.mark.parametrize("trainer", list(COMPILED))
def test_torch_compile_compiles_nothing_after_warm_up_in_every_trainer(trainer, tiny_models, shard_dir, tmp_path):
    # Which graphs exist and when they recompile is dynamo's decision, the backend's only how they run: aot_eager
    # captures forward and backward as inductor would, without minutes of C++ compilation per trainer on a CPU.
    script, extra, model = COMPILED[trainer]
    args = [*_common(tiny_models, shard_dir), "--pretrained_model_name_or_path", getattr(tiny_models, model)]
    run_script(script, *args, *extra, "--output_dir", tmp_path, "--mixed_precision", "bf16",
               "--max_train_steps", 4, "--logging_steps", 2, "--train_batch_size", 2, "--torch_compile",
               "--torch_compile_backend", "aot_eager", "--checkpointing_steps", 3, "--validation_steps", 3,
               "--num_heldout_samples", 2, "--num_validation_images", 1, "--validation_inference_steps", 2)
    # a checkpoint, a held-out loss and a validation image between compiled steps (25 denoising steps of a bf16
    # ControlNet pipeline took 2 minutes here: CPU convolutions in bf16 take a slow path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["compiled_graphs"] > 0 and metrics["graphs_compiled_after_first_read"] == 0


def test_the_heldout_loss_does_not_depend_on_the_training_weighting(tiny_models):
    """--snr_gamma (and a flow family's --weighting_scheme) weigh the training loss; the held-out loss, "comparable
    across steps and runs", measured with them too (snr_gamma 5 against 0: 0.93 against 1.16 for the same weights)."""
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from sketch2real.training.diffusion import DenoisingObjective, FlowMatchingObjective
    from sketch2real.training.task import DiffusionTask, HeldOut

    vae = AutoencoderKL.from_pretrained(tiny_models.sd / "vae")
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def heldout(objective) -> float:
        task = SimpleNamespace(predictor=lambda model: lambda noisy, t, prompts: noisy / 2, c=SimpleNamespace(vae=vae),
                               objective=objective, heldout=HeldOut(images, [""] * 6),
                               opts=SimpleNamespace(seed=0))
        return DiffusionTask.heldout_metrics(task, None)["heldout_loss"]

    ddpm = DDPMScheduler(prediction_type="v_prediction")  # Min-SNR weighs every timestep then
    assert heldout(DenoisingObjective(ddpm, snr_gamma=5.0)) == heldout(DenoisingObjective(ddpm))
    flow = FlowMatchEulerDiscreteScheduler()
    assert heldout(FlowMatchingObjective(flow, "logit_normal")) == heldout(FlowMatchingObjective(flow, "none"))


def test_throughput_leaves_out_validation_and_checkpoints_inside_the_loop(monkeypatch):
    """samples/s counted the validations and checkpoints between steps (a 200-step LoRA: 57.9 samples/s without
    validation, 31.6 with one every 50 steps); now only training's time, on a clock the test moves."""
    from sketch2real.training import callbacks

    now = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: now[0])
    run = callbacks.Run(*[None] * 8, bar=None, step=0, start_step=0, last_checkpoint=None)
    for step, seconds, pause in [(1, 1.0, 0.0), (2, 1.0, 10.0), (3, 1.0, 0.0)]:  # 10 s of validation after step 2
        now[0] += seconds
        run.step = step
        run.mark_timing()
        with run.paused():
            now[0] += pause
    assert run.steady_steps_per_second() == 2 / 2.0  # steps 2-3 in 2 s of training, not 12
    assert run.paused_seconds == 10.0 and run.paused_at_end == 10.0


def test_the_final_validation_reaches_the_tracker_once():
    """The final validation (before_save) came after the last step's logs were sent and never reached TensorBoard; a
    run resumed at its last step (nothing trained here) must not send again what the run that trained it sent."""
    from types import SimpleNamespace

    from sketch2real.training.callbacks import TrackerLog

    sent = []
    accelerator = SimpleNamespace(log=lambda values, step: sent.append((step, dict(values))))
    for start, expected in ((0, [(4, {"loss": 1.0}), (4, {"heldout_loss": 0.5})]), (4, [(4, {"loss": 1.0})])):
        sent.clear()
        run, tracker = SimpleNamespace(accelerator=accelerator, step=4, start_step=start, logs={"loss": 1.0}), TrackerLog()
        tracker.after_step(run)
        run.logs["heldout_loss"] = 0.5  # Validation.before_save
        tracker.before_save(run)
        assert sent == expected


def test_host_peak_memory_is_the_process_own_not_that_of_the_process_it_was_started_from():
    """metrics.json's `peak_memory_mb` on the host: a trainer started by a large process (a bench, a launcher) reported
    that process's peak (Linux keeps `ru_maxrss` across fork and exec); it is its own (VmHWM)."""
    import subprocess
    import sys

    held = bytearray(1536 * 2**20)  # this process: 1.5 GiB, touched
    held[::4096] = b"\x01" * len(held[::4096])
    code = ("import resource, torch; from sketch2real.training.callbacks import peak_memory_mb; "
            "print(peak_memory_mb(torch.device('cpu')), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout.split())
    del held
    assert inherited > 1536 and 50 < own < 1024, (own, inherited)


def test_a_vae_kept_in_fp32_encodes_half_a_chunk_at_a_time_to_the_same_posterior(tiny_models):
    """fp16 runs keep SD's VAE in fp32: a chunk of 8 images in one call made the cache build the run's peak (8.0 GiB
    against bf16's 4.8 on an H200). 16-bit VAEs encode the chunk at once; an fp32 one 4 images a call, same values."""
    import torch
    from diffusers import AutoencoderKL

    from sketch2real.training.latent_store import CHUNK, encode_posterior

    images = torch.rand(CHUNK, 3, 32, 32) * 2 - 1
    for dtype, calls in ((torch.float32, [4, 4]), (torch.bfloat16, [8])):
        vae = AutoencoderKL.from_pretrained(tiny_models.sd, subfolder="vae", torch_dtype=dtype)
        seen, encode = [], vae.encode
        vae.encode = lambda x, encode=encode, seen=seen: seen.append(len(x)) or encode(x)
        with torch.no_grad():
            got = encode_posterior(vae, images, torch.device("cpu"))
            whole = encode(images.to(dtype)).latent_dist
        assert seen == calls and got.mean.dtype == dtype
        assert torch.allclose(got.mean.float(), whole.mean.float(), atol=1e-5 if dtype == torch.float32 else 2e-2)
        assert torch.allclose(got.std.float(), whole.std.float(), atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_a_step_the_fp16_loss_scaler_skipped_moves_neither_the_schedule_nor_the_average():
    """fp16's GradScaler skips a step with inf/NaN gradients; the schedule (stepped here, not prepared) still advanced
    and the EMA averaged the unchanged weights, where diffusers' prepared scheduler skips it. (fp16 needs CUDA: the
    accelerator's report of the skip is given here.) A fused AdamW (the default on CUDA) skips inside its kernel, and
    accelerate, seeing its step called, reported none: the real scaler and wrapper, on the CPU."""
    from types import SimpleNamespace

    import torch
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from sketch2real.training.loop import optimizer_step

    weight = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    weight.grad = torch.ones(1)
    skipped = SimpleNamespace(sync_gradients=True, optimizer_step_was_skipped=True, scaler=None)
    assert optimizer_step(skipped, optimizer, schedule) is False and schedule.last_epoch == 0
    taken = SimpleNamespace(sync_gradients=True, optimizer_step_was_skipped=False, scaler=None)
    assert optimizer_step(taken, optimizer, schedule) is True and schedule.last_epoch == 1
    accumulating = SimpleNamespace(sync_gradients=False, optimizer_step_was_skipped=False, scaler=None)
    assert optimizer_step(accumulating, optimizer, schedule) is False and schedule.last_epoch == 1

    Accelerator(cpu=True)  # the state accelerate's wrapper reads
    for fused in (True, False):
        weight = torch.nn.Parameter(torch.ones(1))
        adamw = torch.optim.AdamW([weight], lr=1.0, fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(adamw, lambda step: 1.0 / (step + 1))
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        wrapped = AcceleratedOptimizer(adamw, device_placement=False, scaler=scaler)
        accelerator = type("Accelerator", (), {"sync_gradients": True, "scaler": scaler,
                                               "optimizer_step_was_skipped": property(lambda _, w=wrapped: w.step_was_skipped)})()
        scaler.scale(weight.sum() * float("inf")).backward()
        assert optimizer_step(accelerator, wrapped, schedule) is False and schedule.last_epoch == 0, fused
        assert weight.item() == 1.0
        adamw.zero_grad()
        scaler.scale(weight.sum()).backward()
        assert optimizer_step(accelerator, wrapped, schedule) is True and schedule.last_epoch == 1, fused
        assert weight.item() != 1.0
