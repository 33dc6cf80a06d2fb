"""The side concerns of the training loop, one small class each (as mosaicml/diffusion's `callbacks/`): the NaN
guard, validation, tracker logging, checkpointing with preemption, the run summary and the model card.

The loop (`sketch2real.training.loop.train`) calls every callback's `before_train` before the first step and its
`after_step` after each optimizer step, in order; one that returns an exit status ends the run with it. After the
last step it calls `before_save` (which may also end the run), the task saves its artifacts, then `after_save`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sketch2real.io import atomic_open, read_jsonl, write_json, write_jsonl
from sketch2real.shards import corrupt_samples
from sketch2real.training.accelerator import (
    compiled_graphs,
    cudagraph_skips,
    finish_trackers,
    innermost_optimizer,
    main_process_view,
)
from sketch2real.training.checkpoints import output_files, save_checkpoint
from sketch2real.training.hub import hub_repo_id, push_output
from sketch2real.training.model_card import CARD, model_card
from sketch2real.training.preemption import PREEMPTED_EXIT_CODE, Preempted, mark_preempted

logger = logging.getLogger("sketch2real")


@dataclass
class Run:
    """What callbacks see of a run: its parts, where it is, and this step's logs."""

    task: Any
    opts: Any
    accelerator: Any
    model: torch.nn.Module  # the prepared (wrapped) model
    optimizer: Any
    lr_scheduler: Any
    out: Path
    fingerprint: dict
    bar: Any
    step: int
    start_step: int
    last_checkpoint: int | None  # the last step saved (None: none yet)
    start_time: float = field(default_factory=time.perf_counter)
    end_time: float | None = None  # when the last step ended (throughput excludes the final validation and saving)
    last_loss: float = math.nan  # the loss of the last step read back
    step_finite: bool = True  # every loss since the last read was finite on every process
    first_bad_step: int | None = None  # the first step whose loss was not finite (on any process)
    host_reads: int = 0  # reads of device values by the loop (one per `reads_due` step)
    timed_from: tuple[int, float] | None = None  # (step, time) of the first read: after warm-up and compilation
    # seconds of validation and checkpoints inside the loop (throughput is training's): in all, and by the first and
    # the last read
    paused_seconds: float = 0.0
    paused_at_first_read: float = 0.0
    paused_at_end: float = 0.0
    graphs_at_first_read: int = 0  # graphs torch.compile had compiled by then
    preempted: bool = False  # a preemption signal reached some process (one collective decides, for all)
    logs: dict[str, Any] = field(default_factory=dict)  # this step's: loss, lr, validation
    summary: dict[str, Any] = field(default_factory=dict)  # metrics.json, once written
    # the average validated and saved (`sketch2real.training.averages`: --use_ema's, schedule-free's; None: none)
    averaged: Any = None
    cache_peak_memory_mb: float | None = None  # the peak before training: loading and the latent caches' build

    @contextlib.contextmanager
    def paused(self):
        """Time that is not training's: off the throughput's clock."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    def checkpoint(self) -> None:
        """A checkpoint at this step (the EMA's share of every process in it), then the task's own files of it."""
        with self.paused():
            self._checkpoint()

    def _checkpoint(self) -> None:
        save_checkpoint(self.accelerator, self.out, self.step, self.opts.checkpoints_total_limit, self.fingerprint,
                        extra=self.averaged.save if self.averaged is not None else None,
                        # a resume at the last step trains nothing: its loss; the schedule's steps (fp16 skips some)
                        state={"last_loss": self.last_loss, "schedule_steps": self.lr_scheduler.last_epoch})
        with self.evaluation_weights():  # the task's files of the step (TI's embeddings, a LoRA) as a final save's
            self.task.on_checkpoint(self.accelerator, self.model, self.step)
        self.last_checkpoint = self.step

    def evaluation_weights(self):
        """The weights validation sees and the final save writes: the average with --use_ema or schedule-free AdamW (a
        collective under DeepSpeed), else the trained ones."""
        return self.averaged.swapped_in() if self.averaged is not None else contextlib.nullcontext()

    def learning_rate(self) -> float:
        """The learning rate as diffusers' scripts log it: the schedule's after its step (the next step's), or
        schedule-free AdamW's own warm-up (its `scheduled_lr`, the last step's)."""
        return self.optimizer.param_groups[0].get("scheduled_lr", self.lr_scheduler.get_last_lr()[0])

    def mark_timing(self) -> None:
        """Called by the loop right after a read of device values (the device has caught up): the first read starts
        the steady-state clock, each later one moves its end."""
        now = time.perf_counter()
        if self.timed_from is None:
            self.timed_from = (self.step, now)
            self.graphs_at_first_read = compiled_graphs()
            self.paused_at_first_read = self.paused_seconds
        self.end_time = now
        self.paused_at_end = self.paused_seconds

    def steady_steps_per_second(self) -> float | None:
        """Steps per second between the first read and the last one (None: fewer than two reads)."""
        if self.timed_from is None or self.end_time is None or self.step <= self.timed_from[0]:
            return None
        return (self.step - self.timed_from[0]) / (self.end_time - self.timed_from[1]
                                                    - (self.paused_at_end - self.paused_at_first_read))

    def stop_preempted(self, save: bool = True) -> int:
        """Checkpoint at this step on every process (`save`: False where the run resumed from this step's, unchanged),
        leave PREEMPTED for slurm/common.sh, return exit status 75."""
        if save:
            self.checkpoint()
        self.bar.close()
        mark_preempted(self.accelerator, self.out, f"checkpoint {'saved' if save else 'kept'} at step {self.step}")
        finish_trackers(self.accelerator)
        return PREEMPTED_EXIT_CODE


class Callback:
    """One side concern of the loop. Each hook may return an exit status to end the run with it."""

    def before_train(self, run: Run) -> int | None:
        return None

    def after_step(self, run: Run) -> int | None:
        return None

    def before_save(self, run: Run) -> int | None:
        return None

    def after_save(self, run: Run) -> None:
        return None


class NanGuard(Callback):
    """A non-finite loss on any process stops the run with status 1, naming the last good checkpoint."""

    def after_step(self, run: Run) -> int | None:
        if run.step_finite:
            return None
        run.bar.close()
        where = (f"the last good checkpoint is {run.out / f'checkpoint-{run.last_checkpoint}'}" if run.last_checkpoint
                 else "no checkpoint was saved yet")
        if run.accelerator.is_main_process:
            logger.error("loss is not finite at step %d: stopping at step %d; %s (try a lower --learning_rate, or bf16)",
                         run.first_bad_step or run.step, run.step, where)
        finish_trackers(run.accelerator)
        return 1


class Validation(Callback):
    """`task.validate` every `--validation_steps` and at the end (unless the last step just did), its values into
    the step's logs and `validation_log.jsonl`; a preemption during validation stops at the next checkpoint, and the
    resumed run validates that step first."""

    def __init__(self) -> None:
        self.validated_at: int | None = None

    def before_train(self, run: Run) -> int | None:
        """What validation wrote past the step the run starts from (a resume: the steps it trains again; a fresh
        start: an earlier run's) goes: `validation_log.jsonl` listed those steps twice, and the card showed an
        earlier run's mosaic. A run resumed at a validation step that has neither a row nor a mosaic (a preemption
        stopped its validation, then checkpointed) validates it now: its point was missing from the log for good."""
        log, mosaics = run.out / "validation_log.jsonl", run.out / "validation"
        if run.accelerator.is_main_process:
            if log.is_file():
                write_jsonl(log, [row for row in read_jsonl(log) if row.get("step", 0) <= run.step])
            for mosaic in mosaics.glob("step-*.png"):
                if (found := re.fullmatch(r"step-(\d+)\.png", mosaic.name)) and int(found[1]) > run.step:
                    mosaic.unlink()
        every = run.opts.validation_steps
        if not (every and run.step and run.step % every == 0 and run.step < run.opts.max_train_steps):
            return None  # (the last step's validation is `before_save`'s, done or not)
        done = lambda: (mosaics / f"step-{run.step:06d}.png").is_file() or (  # noqa: E731
            log.is_file() and any(row.get("step") == run.step for row in read_jsonl(log)))
        if main_process_view(run.accelerator, done):
            return None
        validated = self._validate(run)
        if validated is None:
            return run.stop_preempted(save=False)  # the checkpoint it resumed from is this step's
        if validated:
            run.accelerator.log(validated, step=run.step)
        return None

    def _validate(self, run: Run) -> dict[str, float] | None:
        """The step's validation values (also in `run.logs` and the log file); None: preempted (raised on every process
        together: a collective check)."""
        try:
            with run.paused(), run.evaluation_weights():
                validated = run.task.validate(run.accelerator, run.model, run.step)
        except Preempted:
            run.model.train()
            return None
        run.logs.update(validated)
        self.validated_at = run.step
        if run.accelerator.is_main_process and validated:  # the style arriving, without a tracker too
            log = run.out / "validation_log.jsonl"  # a step once (a resume at the last step validates it again)
            rows = [row for row in read_jsonl(log) if row.get("step") != run.step] if log.is_file() else []
            write_jsonl(log, [*rows, {"step": run.step, **validated}])
        return validated

    def after_step(self, run: Run) -> int | None:
        every = run.opts.validation_steps
        if every and run.step % every == 0 and self._validate(run) is None:
            run.preempted = True
        return None

    def before_save(self, run: Run) -> int | None:
        if run.opts.validation_steps and self.validated_at != run.step and self._validate(run) is None:
            return run.stop_preempted()
        return None


class TrackerLog(Callback):
    """The step's logs to the experiment tracker (steps where the loop read the loss back, or validated), and the
    final validation's, which comes after the last step's were sent (`Validation.before_save`)."""

    def __init__(self) -> None:
        self.sent: tuple[int, set[str]] = (-1, set())  # the step and the names sent for it

    def after_step(self, run: Run) -> int | None:
        if run.logs:
            run.accelerator.log(run.logs, step=run.step)
        self.sent = (run.step, set(run.logs))
        return None

    def before_save(self, run: Run) -> int | None:
        step, names = self.sent
        later = {k: v for k, v in run.logs.items() if step != run.step or k not in names}
        if later and run.step > run.start_step:  # (none trained here: the run that trained them sent them)
            run.accelerator.log(later, step=run.step)
        return None


class Checkpointing(Callback):
    """A checkpoint every `--checkpointing_steps` (the last step's too, as diffusers' scripts: a run extended with more
    steps continues from there), and at once when preempted, then exit 75 for the requeue."""

    def after_step(self, run: Run) -> int | None:
        if run.preempted:
            return run.stop_preempted()
        every = run.opts.checkpointing_steps
        if every and run.step % every == 0:
            run.checkpoint()
        return None


def peak_memory_mb(device: torch.device) -> float:
    """The device's peak of allocated memory; on the host, this process's peak RSS since it started its program:
    Linux's VmHWM (`ru_maxrss` keeps the peak of the process it was forked from: a trainer started by a large bench
    or launcher reported that one's)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = process_memory_bytes("VmHWM")
    return peak / 2**20 if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_memory_bytes(field: str) -> int | None:
    """This process's `field` of Linux's /proc/self/status (VmRSS: now; VmHWM: its peak), in bytes; None elsewhere."""
    status = Path("/proc/self/status")
    found = re.search(rf"{field}:\s+(\d+) kB", status.read_text()) if status.is_file() else None
    return int(found[1]) * 1024 if found else None


def optimizer_dtypes(optimizer) -> dict[str, list[str]]:
    """Dtypes of what the optimizer updates and of its state (AdamW's moments; uint8 for 8-bit AdamW): the innermost
    torch optimizer's, under accelerate's and DeepSpeed's wrappers (DeepSpeed's are its fp32 master partitions)."""
    inner = innermost_optimizer(optimizer)
    # the state's keys too: ZeRO-3 keeps its fp32 partitions there and leaves param_groups empty between steps
    params = {str(p.dtype) for group in inner.param_groups for p in group["params"]} | {str(p.dtype) for p in inner.state}
    # every non-scalar state tensor: 8-bit AdamW's moments are uint8 (with fp32 quantile maps and block scales)
    state = {str(v.dtype) for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    return {"parameters": sorted(params), "state": sorted(state)}


# The weight files that tell what an output folder holds (the card and generation read a folder by them) and the
# EMA run's trained weights beside the average: what an earlier run of other settings leaves behind misleads both.
MODEL_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_comfyui.safetensors",
               "pytorch_lokr_weights.safetensors", "learned_embeds.safetensors", "learned_embeds-steps-*.safetensors",
               "without_ema/*")


class EarlierOutputs(Callback):
    """Weight files (`MODEL_FILES`) an earlier finished run of other settings left in `--output_dir` (its metrics.json
    lists them) that this run did not write again are removed once this run's are saved: a full fine-tune saved where
    a LoRA run was kept the LoRA file, and the card and generation loaded the base model with that old LoRA. What they
    were when this run started is kept in `EARLIER` until then, so a resumed run tells them from its own files."""

    EARLIER = ".earlier_outputs.json"  # an earlier run's weight files -> their (inode, size, mtime) at this run's start

    def __init__(self) -> None:
        self.earlier: dict[str, list] = {}

    def before_train(self, run: Run) -> int | None:
        if not run.accelerator.is_main_process:
            return None
        record = run.out / self.EARLIER
        if run.start_step:  # resumed: what this run saw at its start (none: none to remove)
            with contextlib.suppress(OSError, ValueError):
                self.earlier = json.loads(record.read_text())
            return None
        try:
            summary = json.loads((run.out / "metrics.json").read_text())
        except (OSError, ValueError):
            summary = None
        if isinstance(summary, dict) and not run.fingerprint.matches(summary.get("fingerprint")):
            self.earlier = {name: _identity(run.out / name) for name in summary.get("outputs") or {}
                            if any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES) and (run.out / name).is_file()}
        if self.earlier:
            write_json(record, self.earlier)
        else:
            record.unlink(missing_ok=True)
        return None

    def after_save(self, run: Run) -> None:
        if not run.accelerator.is_main_process:
            return
        left = [name for name, seen in self.earlier.items() if (run.out / name).is_file()
                and _identity(run.out / name) == seen]
        for name in left:
            (run.out / name).unlink()
        for name in sorted(left, key=lambda n: -n.count("/")):  # their folders (without_ema/...), deepest first, once empty
            folder = (run.out / name).parent
            while folder != run.out:
                with contextlib.suppress(OSError):
                    folder.rmdir()
                folder = folder.parent
        (run.out / self.EARLIER).unlink(missing_ok=True)
        if left:
            logger.info("removed %d file(s) of the weights an earlier run of other settings left in %s: %s", len(left),
                        run.out, ", ".join(left))


def _identity(path: Path) -> list:
    """What changes when a file is written again (a rewrite in place or a new file renamed over it)."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]  # (a list: as the record reads back)


class RunSummary(Callback):
    """`metrics.json` (throughput without the one-off latent cache, memory, precision, optimizer dtypes, final LR,
    corrupt samples, the last validation) and a one-line summary."""

    def after_save(self, run: Run) -> None:
        from accelerate.utils import gather_object

        accelerator, task = run.accelerator, run.task
        cache = task.cache_stats()
        peaks = gather_object([round(peak_memory_mb(accelerator.device), 1)])  # each rank's, in rank order
        # the clock starts after the latent cache and stops at the last read; validation and checkpoints are not in it
        elapsed = ((run.end_time or time.perf_counter()) - run.start_time
                   - (run.paused_at_end if run.end_time else run.paused_seconds))
        steps_done = run.step - run.start_step
        steady = run.steady_steps_per_second()
        summary = {
            "trainer": task.trainer,
            "steps": run.step,
            "steps_this_run": steps_done,
            "final_loss": run.last_loss,
            # None where this run trained no step (resumed at the last step's checkpoint to redo an output)
            "samples_per_second": steps_done * task.samples_per_step() / elapsed if steps_done and elapsed > 0 else None,
            "steps_per_second": steps_done / elapsed if steps_done and elapsed > 0 else None,
            # after the first read of the loss (warm-up and compilation left out); None when read only once
            "steady_steps_per_second": steady,
            "steady_samples_per_second": steady * task.samples_per_step() if steady is not None else None,
            "steady_from_step": run.timed_from[0] if run.timed_from else None,
            "validation_and_checkpoint_seconds": run.paused_seconds,  # the final validation's too: not in throughputs
            "host_reads": run.host_reads,
            # --torch_compile: graphs compiled in all, and after the first read (recompiles: 0 when shapes are static)
            "compiled_graphs": compiled_graphs(),
            "graphs_compiled_after_first_read": compiled_graphs() - run.graphs_at_first_read if run.timed_from else None,
            "cudagraph_skips": cudagraph_skips(),  # reduce-overhead: graphs inductor ran without CUDA graphs
            # the highest of the processes' peaks (rank 0's alone before: another rank's can be the one that does not fit)
            "peak_memory_mb": max(peaks),
            "peak_memory_mb_per_process": peaks,
            "cache_peak_memory_mb": run.cache_peak_memory_mb,
            "data_wait_seconds_per_step": task.data_wait_seconds() / steps_done if steps_done else 0.0,
            "num_processes": accelerator.num_processes,
            "num_nodes": accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)),
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "mixed_precision": accelerator.mixed_precision,
            "optimizer_dtypes": optimizer_dtypes(run.optimizer),
            "final_lr": run.learning_rate(),
            "effective_learning_rate": run.optimizer.param_groups[0].get("initial_lr", run.learning_rate()),
            "latent_cache": cache,
            "corrupt_samples": corrupt_samples.summary(corrupt_samples.gathered(accelerator)),
            **{k: v for k, v in run.logs.items() if k not in ("loss", "lr")},
            "fingerprint": run.fingerprint,  # what a rerun with --resume_from_checkpoint latest finds finished
        }
        if accelerator.is_main_process:
            summary["outputs"] = output_files(run.out)
        run.summary = summary
        if accelerator.is_main_process:
            write_json(run.out / "metrics.json", summary)
            speed = "no step trained here" if summary["samples_per_second"] is None else \
                f"{summary['samples_per_second']:.2f} samples/s"
            print(f"done: {run.step} steps, final loss {run.last_loss:.4f}, {speed}, "
                  f"peak memory {summary['peak_memory_mb']:.0f} MiB -> {run.out}", flush=True)


class ModelCard(Callback):
    """`README.md` beside the trained model (`sketch2real.training.model_card`): base, data, settings, metrics with
    intervals, the last mosaic, how to load it. `pushed_as`: (hub repository, folder in it) where another run pushes
    this one's folder (a sequential run's stage), so the card loads from there."""

    def __init__(self, pushed_as: tuple[str, str] | None = None) -> None:
        self.pushed_as = pushed_as

    def after_save(self, run: Run) -> None:
        repo_id, subfolder = self.pushed_as or ((hub_repo_id(run.opts), "") if run.opts.push_to_hub else (None, ""))
        if run.accelerator.is_main_process:
            with atomic_open(run.out / CARD) as f:
                f.write(model_card(run.opts, run.task.trainer, run.summary, run.out, run.task.family,
                                   run.task.card_prompt(), repo_id, subfolder))


class PushToHub(Callback):
    """With `--push_to_hub`: the output folder, card included, to the hub repository created at the start
    (`sketch2real.training.hub`)."""

    def after_save(self, run: Run) -> None:
        if run.opts.push_to_hub:
            push_output(run.accelerator, run.opts, run.out, f"End of training: {run.step} steps")


def default_callbacks() -> list[Callback]:
    """In this order: a NaN stops before anything is saved; validation's values reach the tracker; checkpoints; an
    earlier run's weight files gone before the summary lists the outputs and the card shows them; the upload of all."""
    return [NanGuard(), Validation(), TrackerLog(), Checkpointing(), EarlierOutputs(), RunSummary(), ModelCard(),
            PushToHub()]
