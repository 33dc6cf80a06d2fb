"""The one training loop every trainer uses: the optimizer and its schedule, resume, the step (accumulation,
clipping, one collective), and the callbacks that own every side concern (`sketch2real.training.callbacks`: NaN
guard, validation, tracker, checkpoints and preemption, the run summary).

A trainer supplies a `Task`: the single module to train (DDP/DeepSpeed wrap it),
its loss for a (step, micro-step), what to save, and what to validate.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch

from sketch2real.cli import UserError, as_dict
from sketch2real.io import human_bytes, link_identical_files, write_json
from sketch2real.training.accelerator import (
    finish_trackers,
    fp32_trained_weights,
    innermost_optimizer,
    optimizer_sharded,
    partition_before_prepare,
    restore_fp32_masters,
)
from sketch2real.training.averages import averaged_weights
from sketch2real.training.callbacks import Callback, Run, default_callbacks, peak_memory_mb
from sketch2real.training.checkpoints import (
    load_checkpoint,
    past_the_end,
    read_train_state,
    resolve_resume,
    run_fingerprint,
)
from sketch2real.training.preemption import clear_preempted, preemption

logger = logging.getLogger("sketch2real")


class Task(Protocol):
    """What a trainer plugs into `train`."""

    model: torch.nn.Module  # the module trained (unwrapped); the loop passes its prepared version to every hook

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def param_groups(self) -> list[dict]: ...

    def loss(self, model: torch.nn.Module, step: int, micro: int) -> torch.Tensor: ...

    def samples_per_step(self) -> int: ...

    def on_checkpoint(self, accelerator, model: torch.nn.Module, step: int) -> None: ...

    def validate(self, accelerator, model: torch.nn.Module, step: int) -> dict[str, float]: ...

    def save_final(self, accelerator, model: torch.nn.Module, out: Path) -> None: ...

    def prepare_data(self, start_step: int) -> None: ...

    def compile(self) -> None: ...

    def data_wait_seconds(self) -> float: ...

    def cache_stats(self) -> dict: ...


def effective_learning_rate(opts, num_processes: int) -> float:
    """`--learning_rate`, times the global batch (accumulation x per-device batch x processes) with `--scale_lr`."""
    scale = opts.gradient_accumulation_steps * opts.train_batch_size * num_processes if opts.scale_lr else 1
    return opts.learning_rate * scale


def make_optimizer(params: list[torch.nn.Parameter] | list[dict], opts, device: torch.device, learning_rate: float,
                   sharded: bool = False, zero: bool = False) -> torch.optim.Optimizer:
    """AdamW (fused: one kernel for all parameters, on CUDA and CPU), bitsandbytes' 8-bit AdamW, Prodigy, or
    schedule-free AdamW (its own linear warm-up over --lr_warmup_steps; the schedule stays constant).

    `sharded`: each process steps only its part of the parameters (ZeRO): Prodigy then sums its step-size estimate
    over the processes (its `fsdp_in_use`), or each would estimate its own. `zero`: under DeepSpeed ZeRO, which steps
    each parameter group on its own (one process or several).
    """
    if opts.optimizer == "adamw_schedulefree":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=learning_rate, betas=(opts.adam_beta1, opts.adam_beta2),
                                 eps=opts.adam_epsilon, weight_decay=opts.adam_weight_decay,
                                 warmup_steps=opts.lr_warmup_steps)
    if opts.optimizer == "prodigy":
        from prodigyopt import Prodigy

        if zero and params and isinstance(params[0], dict):  # ZeRO-1/2 step each group apart; ZeRO-3 each sub-group
            params = _one_group_if_alike(params)
        if zero and len(params) > 1 and isinstance(params[0], dict):
            raise UserError.on_every_rank(
                f"--optimizer prodigy estimates one step size for all trained weights, and DeepSpeed ZeRO steps each of "
                f"the {len(params)} parameter groups here (--train_text_encoder's text encoders, or token rows, at their own "
                f"settings) on its own, each with its own estimate: use DDP (an accelerate config without DeepSpeed), "
                f"or AdamW")
        if sharded and device.type != "cuda":  # prodigyopt sums its estimate through a tensor it puts on CUDA
            raise UserError("--optimizer prodigy under DeepSpeed ZeRO needs CUDA devices (prodigyopt sums its "
                            "step-size estimate over the processes on CUDA): use DDP here, or AdamW")

        return Prodigy(params, lr=learning_rate, betas=(opts.adam_beta1, opts.adam_beta2), beta3=opts.prodigy_beta3,
                       weight_decay=opts.adam_weight_decay, eps=opts.adam_epsilon, decouple=opts.prodigy_decouple,
                       use_bias_correction=opts.prodigy_use_bias_correction,
                       safeguard_warmup=opts.prodigy_safeguard_warmup, fsdp_in_use=sharded)
    kwargs = dict(lr=learning_rate, betas=(opts.adam_beta1, opts.adam_beta2), weight_decay=opts.adam_weight_decay,
                  eps=opts.adam_epsilon)
    if opts.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=device.type in ("cuda", "cpu"), **kwargs)


def _one_group_if_alike(groups: list[dict]) -> list[dict]:
    """Parameter groups of the same settings as one group (SD 1.x text-encoder adapters at the denoiser's): what
    Prodigy computes on one process, where DeepSpeed ZeRO steps each group apart."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in groups]
    if any(s != settings[0] for s in settings):
        return groups
    return [{**settings[0], "params": [p for group in groups for p in group["params"]]}]


def check_optimizer_kept(opts, built: type, prepared) -> None:
    """One-line error where `prepare` replaced the optimizer: with DeepSpeed's optimizer offload, accelerate swaps any
    client optimizer for DeepSpeed's CPU Adam (unless the config sets zero_force_ds_cpu_optimizer: false), which is
    AdamW for torch's AdamW, and silently something else for Prodigy, schedule-free or 8-bit AdamW."""
    inner = type(innermost_optimizer(prepared))
    if inner is built or (built is torch.optim.AdamW and inner.__name__ == "DeepSpeedCPUAdam"):
        return
    chosen = "--use_8bit_adam" if opts.use_8bit_adam else f"--optimizer {opts.optimizer}"
    raise UserError.on_every_rank(f"DeepSpeed's optimizer offload replaced {chosen} ({built.__name__}) with {inner.__name__}: set "
                    f"zero_force_ds_cpu_optimizer: false in a DeepSpeed config file (deepspeed_config_file) to keep it, "
                    f"or use --optimizer adamw")


def check_step_counting(optimizer) -> None:
    """One-line error where ZeRO-3 would make an optimizer that counts its steps in its parameter groups (Prodigy,
    schedule-free AdamW: their `k` drives warm-up, bias correction and the average's weights) count each step several
    times. ZeRO-3 calls the torch optimizer once per sub-group (up to `sub_group_size` elements of a process's
    partition, 1e9 by default: a full SDXL UNet over fewer than three processes), and each call counts a step in
    every group."""
    inner = innermost_optimizer(optimizer)
    wrapper = optimizer
    while wrapper is not None and not hasattr(wrapper, "sub_group_to_group_id"):
        wrapper = getattr(wrapper, "optimizer", None)
    if wrapper is None or "k" not in inner.defaults or len(wrapper.sub_group_to_group_id) <= 1:
        return
    raise UserError(f"{type(inner).__name__} counts its steps per call, and ZeRO-3 calls it once per sub-group "
                    f"({len(wrapper.sub_group_to_group_id)} here): raise zero_optimization.sub_group_size above the "
                    f"trained parameter count in a DeepSpeed config file (deepspeed_config_file), or use ZeRO-2")


def reads_due(step: int, opts) -> bool:
    """Whether the loop reads the loss back at `step`: every `--logging_steps`, and before anything is saved or
    validated (a checkpoint or validation step, the last step), so no non-finite weights are ever written."""
    return step == opts.max_train_steps or any(every and step % every == 0 for every in
                                               (opts.logging_steps, opts.checkpointing_steps, opts.validation_steps))


def _tracker_config(opts) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in as_dict(opts).items()}


def check_same_trainer(out: Path, trainer: str) -> None:
    """An output folder holding another trainer's finished run (its metrics.json) is refused in one line: a ControlNet
    saved beside a DreamBooth pipeline made a folder that loads as one and is described as the other."""
    summary = out / "metrics.json"
    previous = json.loads(summary.read_text()).get("trainer") if summary.is_file() else None
    if previous and previous != trainer:
        raise UserError.on_every_rank(f"--output_dir {out} holds a finished {previous} run (its metrics.json): this {trainer} run's files "
                        "would mix with its files; give another --output_dir")



def optimizer_step(accelerator, optimizer, lr_scheduler) -> bool:
    """The optimizer's step, and the schedule's once per optimizer step; whether the weights moved. A step fp16's
    loss scaler skipped (inf/NaN gradients; DeepSpeed's overflow) moves neither the schedule nor the EMA, as
    diffusers' prepared scheduler skips it. A fused optimizer (AdamW's default on CUDA) skips inside its kernel, so
    accelerate, which sees its step called, reports none: the scaler's scale fell then (it falls on a skip alone),
    one host read a step in fp16 (an unfused optimizer's skip is the scaler's own host read)."""
    scaler = accelerator.scaler if accelerator.sync_gradients else None
    if scaler is not None and not getattr(innermost_optimizer(optimizer), "_step_supports_amp_scaling", False):
        scaler = None
    scale = scaler._scale.clone() if scaler is not None else None  # on the device: no wait here
    optimizer.step()
    if not accelerator.sync_gradients or accelerator.optimizer_step_was_skipped:
        return False
    if scaler is not None and bool(scaler._scale < scale):
        return False
    lr_scheduler.step()
    return True


def train(task: Task, opts, accelerator, project_name: str, callbacks: list[Callback] | None = None) -> int:
    """Run the loop to `opts.max_train_steps` with `callbacks` (default: `default_callbacks()`); returns the process
    exit status (0, 1 or 75).

    Ends this run's trackers, not the process group: the caller owns the accelerator
    (sequential DreamBooth runs one loop per stage on the same one).
    """
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    out = Path(opts.output_dir)
    check_same_trainer(out, task.trainer)
    learning_rate = effective_learning_rate(opts, accelerator.num_processes)
    groups = task.param_groups()  # a group's own "lr"/"weight_decay" where it has them, else the options'
    params = [p for group in groups for p in group["params"]]
    plugin = accelerator.state.deepspeed_plugin
    optimizer = make_optimizer(groups, opts, accelerator.device, learning_rate, sharded=optimizer_sharded(accelerator),
                               zero=plugin is not None and plugin.zero_stage >= 1)
    # The schedule is a function of global optimizer steps: stepped here once per optimizer step, not prepared
    # (accelerate would step it once per process and checkpoint that count), and fast-forwarded on resume, so a
    # checkpoint resumes on any number of processes with the same learning rates.
    # schedule-free AdamW warms up itself (--lr_warmup_steps): a schedule on top would warm up twice
    schedule = "constant" if opts.optimizer == "adamw_schedulefree" else opts.lr_scheduler
    lr_scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=opts.lr_warmup_steps,
                                 num_training_steps=opts.max_train_steps, num_cycles=opts.lr_num_cycles, power=opts.lr_power)
    initial = fp32_trained_weights(task.model)
    partition_before_prepare(accelerator, task.model)
    built = type(optimizer)
    model, optimizer = accelerator.prepare(task.model, optimizer)
    check_optimizer_kept(opts, built, optimizer)
    restore_fp32_masters(accelerator, model, initial)
    del initial
    check_step_counting(optimizer)
    averaged = averaged_weights(opts, accelerator, model, optimizer)
    fingerprint = run_fingerprint(opts, accelerator.num_processes)
    resume = resolve_resume(accelerator, out, opts.resume_from_checkpoint, fingerprint)
    if accelerator.is_main_process:
        clear_preempted(out)
    step = 0
    if resume is not None:
        step = load_checkpoint(accelerator, resume)
        if step > opts.max_train_steps:  # its data order and schedule would run backwards (a traceback, before)
            raise UserError.on_every_rank(past_the_end(resume, step, opts.max_train_steps))
        if averaged is not None:
            averaged.load(resume)
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": so it is, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            # the steps the schedule took (fp16's skipped steps took none); an older checkpoint's: all of them
            for _ in range((read_train_state(resume) or {}).get("schedule_steps", step)):
                lr_scheduler.step()
        logger.info("resumed from %s at step %d", resume, step)
    elif opts.resume_from_checkpoint:
        logger.info("no checkpoint in %s: starting from step 0", out)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        # the options, as resolved here (the precision: config, flag or environment): a --config for a rerun
        write_json(out / "run_config.json", {**as_dict(opts), "mixed_precision": accelerator.mixed_precision})
        # resumed: TensorBoard drops what the killed run logged after its checkpoint (logged again, twice before)
        purge = {"tensorboard": {"purge_step": step + 1}} if resume is not None else {}
        accelerator.init_trackers(opts.tracker_project_name or project_name, config=_tracker_config(opts), init_kwargs=purge)
    model.train()  # as after every validation (`from_pretrained` gives eval mode: a compiled graph per mode otherwise)
    if opts.torch_compile:
        task.compile()
    task.prepare_data(step)  # latent caches, before the clock: their time is reported apart
    cache_peak = peak_memory_mb(accelerator.device)  # the run's peak so far: the caches' build (fp16: an fp32 VAE)
    if accelerator.device.type == "cuda":  # the peak of training, not of the cache build
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    # what will run, said before the first step (a job's log said it only at the end)
    logger.info("%s: %s, steps %d to %d, global batch %d (%d x %d processes x %d accumulated), %s, lr %g -> %s",
                project_name, opts.pretrained_model_name_or_path, step, opts.max_train_steps,
                opts.train_batch_size * accelerator.num_processes * opts.gradient_accumulation_steps, opts.train_batch_size,
                accelerator.num_processes, opts.gradient_accumulation_steps,
                {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision), learning_rate, out)
    bar = tqdm(total=opts.max_train_steps, initial=step, desc=project_name, unit="step",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    run = Run(task, opts, accelerator, model, optimizer, lr_scheduler, out, fingerprint, bar, step=step, start_step=step,
              last_checkpoint=step if resume is not None else None, averaged=averaged, cache_peak_memory_mb=cache_peak)
    if resume is not None:  # the loss read at the checkpoint's step (an older checkpoint has none: nan)
        saved_loss = (read_train_state(resume) or {}).get("last_loss")
        run.last_loss = math.nan if saved_loss is None else float(saved_loss)
    callbacks = default_callbacks() if callbacks is None else callbacks
    for callback in callbacks:
        status = callback.before_train(run)
        if status is not None:
            return status
    # The step never waits for the host: the loss and its finiteness accumulate on the device and are read back
    # (one collective, one host read) only at `reads_due` steps; the progress bar alone moves every step.
    interval = torch.zeros(2, device=accelerator.device)  # [sum of the interval's step losses, non-finite steps]
    first_bad = torch.full((), torch.inf, device=accelerator.device)  # this process's first non-finite step
    interval_steps = 0
    while run.step < opts.max_train_steps:
        if opts.torch_compile:  # a new iteration: CUDA graphs (reduce-overhead) may reuse the last one's buffers
            torch.compiler.cudagraph_mark_step_begin()
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(opts.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                loss = task.loss(model, run.step, micro)
                step_loss += loss.detach().float() / opts.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients and opts.max_grad_norm:
                    accelerator.clip_grad_norm_(params, opts.max_grad_norm)
                stepped = optimizer_step(accelerator, optimizer, lr_scheduler)
                optimizer.zero_grad(set_to_none=opts.set_grads_to_none)
        bad = ~torch.isfinite(step_loss)
        interval += torch.stack([step_loss, bad.float()])
        first_bad = torch.where(bad, torch.clamp(first_bad, max=run.step + 1), first_bad)
        interval_steps += 1
        run.step += 1
        if averaged is not None and stepped:
            averaged.update(run.step)
        bar.update()
        run.logs = {}
        if reads_due(run.step, opts):
            # one collective: the interval's losses and the last step's, finiteness everywhere, preemption anywhere
            flags = torch.cat([interval, step_loss[None], torch.full((1,), 1.0 if preemption else 0.0,
                                                                     device=accelerator.device)])
            interval_sum, not_finite, last, preempted = accelerator.reduce(flags, reduction="sum").tolist()
            run.host_reads += 1
            run.step_finite, run.preempted = not_finite == 0, preempted > 0
            if not run.step_finite:  # the failure path alone: which step went bad first, on any process
                run.first_bad_step = int(accelerator.gather(first_bad[None]).min().item())
            run.mark_timing()
            if run.step_finite:
                run.last_loss = last / accelerator.num_processes
                run.logs = {"loss": interval_sum / accelerator.num_processes / interval_steps,
                            "lr": run.learning_rate()}
                bar.set_postfix(loss=f"{run.logs['loss']:.4f}", lr=f"{run.logs['lr']:.2e}", refresh=False)
            interval.zero_()
            interval_steps = 0
        for callback in callbacks:
            status = callback.after_step(run)
            if status is not None:
                return status
    bar.close()
    for callback in callbacks:
        status = callback.before_save(run)
        if status is not None:
            return status
    trained_folder = averaged.trained_folder if averaged is not None else None
    if averaged is not None:
        if trained_folder:  # the trained weights beside, the average where a user loads the model from
            task.save_final(accelerator, model, out / trained_folder)
            if accelerator.is_main_process:  # a folder generation takes alone (a LoRA's base model is read from it)
                shutil.copy2(out / "run_config.json", out / trained_folder / "run_config.json")
        averaged.install()  # for good: the model in memory is the one saved (a sequential stage measures it)
        run.averaged = None
    task.save_final(accelerator, model, out)
    if trained_folder and accelerator.is_main_process:  # a full pipeline's frozen components (SDXL's: 3.6 GB) once
        freed = link_identical_files(out / trained_folder, out)
        if freed:
            logger.info("%s/ shares the files it holds as %s holds them (hard links: %s not stored twice)",
                        trained_folder, out, human_bytes(freed))
    for callback in callbacks:
        callback.after_save(run)
    finish_trackers(accelerator)
    return 0
