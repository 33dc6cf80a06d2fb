"""Resumable checkpoints (atomic, pruned), `--resume_from_checkpoint latest`, and Slurm preemption."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from pathlib import Path

from sketch2real.cli import UserError
from sketch2real.training.accelerator import checkpoint_kwargs

logger = logging.getLogger("sketch2real")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; slurm/*.sh requeue the job on it
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Finished checkpoints (`checkpoint-N`, never `*.partial`), oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m[1]), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def resolve_resume(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from: None (fresh start), 'latest', or a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        path = Path(output_dir) / resume
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {resume}")
    return path


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None) -> Path:
    """Save a full training state as `checkpoint-<step>`; a kill mid-save leaves only a `.partial` folder."""
    out = Path(output_dir)
    final, partial = out / f"checkpoint-{step}", out / f"checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), **checkpoint_kwargs(accelerator, saving=True))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit:
            for _, old in list_checkpoints(out)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: Path) -> None:
    """Restore a checkpoint of `save_checkpoint` (frozen weights come from the base model, not the checkpoint)."""
    accelerator.load_state(str(folder), **checkpoint_kwargs(accelerator, saving=False))


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM (Slurm's warning before a time limit or preemption)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.raised: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.raised = signum

    def __bool__(self) -> bool:
        return self.raised is not None
