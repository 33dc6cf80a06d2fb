"""The one training loop every trainer uses: accumulation, clipping, checkpoints, resume,
preemption, NaN guard, validation, progress bar and a final summary.

A trainer supplies a `Task`: the single module to train (DDP/DeepSpeed wrap it),
its loss for a (step, micro-step), what to save, and what to validate.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from sketch2real.cli import as_dict
from sketch2real.io import append_jsonl, write_json
from sketch2real.shards import corrupt_samples
from sketch2real.training.accelerator import finish_trackers, fp32_trained_weights, restore_fp32_masters
from sketch2real.training.checkpoints import load_checkpoint, resolve_resume, run_fingerprint, save_checkpoint
from sketch2real.training.preemption import PREEMPTED_EXIT_CODE, Preempted, mark_preempted, preemption

logger = logging.getLogger("sketch2real")


class Task(Protocol):
    """What a trainer plugs into `train`."""

    model: torch.nn.Module  # the module trained; replaced by its prepared (wrapped) version

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def loss(self, model: torch.nn.Module, step: int, micro: int) -> torch.Tensor: ...

    def samples_per_step(self) -> int: ...

    def on_checkpoint(self, accelerator, model: torch.nn.Module, step: int) -> None: ...

    def validate(self, accelerator, model: torch.nn.Module, step: int) -> dict[str, float]: ...

    def save_final(self, accelerator, model: torch.nn.Module) -> None: ...

    def data_wait_seconds(self) -> float: ...

    def cache_stats(self) -> dict: ...


class TrainState:
    """The loop's own resumable state, saved as JSON in each checkpoint (model, optimizer, scheduler and RNG are
    saved by accelerate; nothing of ours is a pickle)."""

    def __init__(self) -> None:
        self.step = 0


def optimizer_dtypes(optimizer) -> dict[str, list[str]]:
    """Dtypes of what the optimizer updates and of its state (AdamW's moments): the innermost torch optimizer's,
    under accelerate's and DeepSpeed's wrappers (DeepSpeed's are its fp32 master partitions)."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    # the state's keys too: ZeRO-3 keeps its fp32 partitions there and leaves param_groups empty between steps
    params = {str(p.dtype) for group in inner.param_groups for p in group["params"]} | {str(p.dtype) for p in inner.state}
    state = {str(v.dtype) for s in inner.state.values() for v in s.values()
             if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0}
    return {"parameters": sorted(params), "state": sorted(state)}


def effective_learning_rate(opts, num_processes: int) -> float:
    """`--learning_rate`, times the global batch (accumulation x per-device batch x processes) with `--scale_lr`."""
    scale = opts.gradient_accumulation_steps * opts.train_batch_size * num_processes if opts.scale_lr else 1
    return opts.learning_rate * scale


def make_optimizer(params: list[torch.nn.Parameter], opts, device: torch.device, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW (fused: one kernel for all parameters, on CUDA and CPU) or bitsandbytes' 8-bit AdamW."""
    kwargs = dict(lr=learning_rate, betas=(opts.adam_beta1, opts.adam_beta2), weight_decay=opts.adam_weight_decay,
                  eps=opts.adam_epsilon)
    if opts.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=device.type in ("cuda", "cpu"), **kwargs)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tracker_config(opts) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in as_dict(opts).items()}


def _stop_preempted(accelerator, task: Task, model, out: Path, step: int, opts, fingerprint: dict, bar) -> int:
    """Checkpoint at `step` on every process, leave PREEMPTED for slurm/common.sh, return exit status 75."""
    save_checkpoint(accelerator, out, step, opts.checkpoints_total_limit, fingerprint)
    task.on_checkpoint(accelerator, model, step)
    bar.close()
    mark_preempted(accelerator, out, f"checkpoint saved at step {step}")
    finish_trackers(accelerator)
    return PREEMPTED_EXIT_CODE


def train(task: Task, opts, accelerator, project_name: str) -> int:
    """Run the loop to `opts.max_train_steps`; returns the process exit status (0, 1 or 75).

    Ends this run's trackers, not the process group: the caller owns the accelerator
    (sequential DreamBooth runs one loop per stage on the same one).
    """
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    out = Path(opts.output_dir)
    learning_rate = effective_learning_rate(opts, accelerator.num_processes)
    params = task.trainable_parameters()
    optimizer = make_optimizer(params, opts, accelerator.device, learning_rate)
    # The schedule is a function of global optimizer steps: stepped here once per optimizer step, not prepared
    # (accelerate would step it once per process and checkpoint that count), and fast-forwarded on resume, so a
    # checkpoint resumes on any number of processes with the same learning rates.
    lr_scheduler = get_scheduler(opts.lr_scheduler, optimizer, num_warmup_steps=opts.lr_warmup_steps,
                                 num_training_steps=opts.max_train_steps, num_cycles=opts.lr_num_cycles, power=opts.lr_power)
    initial = fp32_trained_weights(task.model)
    model, optimizer = accelerator.prepare(task.model, optimizer)
    restore_fp32_masters(accelerator, model, initial)
    del initial
    state = TrainState()
    fingerprint = run_fingerprint(opts, accelerator.num_processes)
    resume = resolve_resume(accelerator, out, opts.resume_from_checkpoint, fingerprint)
    if accelerator.is_main_process:
        (out / "PREEMPTED").unlink(missing_ok=True)
    if resume is not None:
        state.step = load_checkpoint(accelerator, resume)
        for _ in range(state.step):
            lr_scheduler.step()
        logger.info("resumed from %s at step %d", resume, state.step)
    elif opts.resume_from_checkpoint:
        logger.info("no checkpoint in %s: starting from step 0", out)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        # the options as given (a --config for a rerun), and what they resolved to here
        write_json(out / "run_config.json", {**as_dict(opts), "mixed_precision": accelerator.mixed_precision,
                                             "effective_learning_rate": learning_rate})
        accelerator.init_trackers(project_name, config=_tracker_config(opts))
    bar = tqdm(total=opts.max_train_steps, initial=state.step, desc=project_name, unit="step",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    start_time, start_step = time.perf_counter(), state.step
    last_loss = math.nan
    last_checkpoint = state.step if resume is not None else None
    logs: dict[str, float] = {}
    validated_at = None  # the step of the last validation: the end validates unless it was just done
    while state.step < opts.max_train_steps:
        step = state.step
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(opts.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                loss = task.loss(model, step, micro)
                step_loss += loss.detach().float() / opts.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients and opts.max_grad_norm:
                    accelerator.clip_grad_norm_(params, opts.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=opts.set_grads_to_none)
        # One collective per step: the mean loss, whether it is finite everywhere, and preemption anywhere.
        # Built on the device (no float() of a device tensor): the reduce's .tolist() is the step's one host sync.
        flags = torch.stack([step_loss, (~torch.isfinite(step_loss)).float(),
                             torch.full((), 1.0 if preemption else 0.0, device=accelerator.device)])
        flags = accelerator.reduce(flags, reduction="sum").tolist()
        mean_loss = flags[0] / accelerator.num_processes
        if flags[1] > 0:
            bar.close()
            where = f"the last good checkpoint is {out / f'checkpoint-{last_checkpoint}'}" if last_checkpoint else "no checkpoint was saved yet"
            if accelerator.is_main_process:
                logger.error("loss is not finite at step %d: stopping; %s (try a lower --learning_rate, or bf16)", step + 1, where)
            finish_trackers(accelerator)
            return 1
        state.step = step + 1
        last_loss = mean_loss
        logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0]}
        elapsed = time.perf_counter() - start_time
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}", steps_s=f"{(state.step - start_step) / max(elapsed, 1e-9):.2f}")
        bar.update()
        stop = flags[2] > 0
        if opts.validation_steps and state.step % opts.validation_steps == 0:
            try:
                validated = task.validate(accelerator, model, state.step)
            except Preempted:  # raised on every process together (a collective check)
                model.train()
                stop = True
            else:
                logs.update(validated)
                validated_at = state.step
                if accelerator.is_main_process and validated:  # the style arriving, without a tracker too
                    append_jsonl(out / "validation_log.jsonl", [{"step": state.step, **validated}])
        accelerator.log(logs, step=state.step)
        if stop:
            return _stop_preempted(accelerator, task, model, out, state.step, opts, fingerprint, bar)
        if opts.checkpointing_steps and state.step % opts.checkpointing_steps == 0 and state.step < opts.max_train_steps:
            save_checkpoint(accelerator, out, state.step, opts.checkpoints_total_limit, fingerprint)
            task.on_checkpoint(accelerator, model, state.step)
            last_checkpoint = state.step
    bar.close()
    cache = task.cache_stats()
    elapsed = time.perf_counter() - start_time - cache["seconds"]  # the one-off latent cache is reported apart
    steps_done = state.step - start_step
    try:
        final_logs = task.validate(accelerator, model, state.step) if opts.validation_steps and validated_at != state.step else {}
    except Preempted:
        return _stop_preempted(accelerator, task, model, out, state.step, opts, fingerprint, bar)
    if accelerator.is_main_process and final_logs:
        append_jsonl(out / "validation_log.jsonl", [{"step": state.step, **final_logs}])
    task.save_final(accelerator, model)
    summary = {
        "steps": state.step,
        "steps_this_run": steps_done,
        "final_loss": last_loss,
        "samples_per_second": steps_done * task.samples_per_step() / elapsed if elapsed > 0 else 0.0,
        "steps_per_second": steps_done / elapsed if elapsed > 0 else 0.0,
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "data_wait_seconds_per_step": task.data_wait_seconds() / steps_done if steps_done else 0.0,
        "num_processes": accelerator.num_processes,
        "num_nodes": accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)),
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "mixed_precision": accelerator.mixed_precision,
        "optimizer_dtypes": optimizer_dtypes(optimizer),
        "final_lr": lr_scheduler.get_last_lr()[0],
        "latent_cache": cache,
        "corrupt_samples": corrupt_samples.summary(corrupt_samples.gathered(accelerator)),
        **{k: v for k, v in {**logs, **final_logs}.items() if k not in ("loss", "lr")},
    }
    if accelerator.is_main_process:
        write_json(out / "metrics.json", summary)
        print(f"done: {state.step} steps, final loss {last_loss:.4f}, {summary['samples_per_second']:.2f} samples/s, "
              f"peak memory {summary['peak_memory_mb']:.0f} MiB -> {out}", flush=True)
    finish_trackers(accelerator)
    return 0
