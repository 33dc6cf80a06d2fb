"""Slurm preemption at any moment: SIGUSR1/SIGTERM set one process-wide flag, which the loop reads at each step
and long phases (latent caching, class-image generation, validation) read between their pieces; generation and
captioning read it between batches (they resume by skipping what is written).

A phase that sees the flag raises `Preempted`; `training_session` turns that into PREEMPTED in --output_dir and
exit status 75, which slurm/common.sh requeues. What a phase wrote so far (class images, checkpoints) is kept.
"""

from __future__ import annotations

import logging
import signal

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; slurm/*.sh requeue the job on it
RERUN = "rerun the same command: it skips what is written"  # generation's and captioning's way on


class Preempted(Exception):
    """Raised by a long phase when the job was asked to stop (SIGUSR1/SIGTERM)."""


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM (Slurm's warning before a time limit or preemption)."""

    def __init__(self) -> None:
        self.raised: int | None = None

    def install(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> PreemptionFlag:
        """Catch `signals` from now on (idempotent); a fresh job starts unflagged."""
        self.raised = None
        for sig in signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.raised = signum

    def __bool__(self) -> bool:
        return self.raised is not None

    def check(self, accelerator=None) -> None:
        """Raise `Preempted` if a signal came. With `accelerator`, all processes agree first (one small collective):
        use it only where every process passes in step (validation), so that they stop together."""
        raised = bool(self)
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            flag = torch.tensor([1.0 if raised else 0.0], device=accelerator.device)
            raised = accelerator.reduce(flag, reduction="sum").item() > 0
        if raised:
            raise Preempted(f"signal {self.raised}" if self.raised else "signal on another process")


preemption = PreemptionFlag()


def mark_preempted(accelerator, output_dir, what: str, then: str = "rerun with --resume_from_checkpoint latest") -> None:
    """PREEMPTED in `output_dir` (read by slurm/common.sh: requeue the job), written by every process that stops,
    so that it exists before any of them exits (srun may kill the job's other tasks at the first exit); one
    warning line on rank 0."""
    write_preempted(output_dir, what)
    if accelerator.is_main_process:
        logging.getLogger("sketch2real").warning("preempted: %s; %s", what, then)


def write_preempted(output_dir, what: str) -> None:
    """The PREEMPTED file slurm/common.sh looks for (its line says why), in `output_dir`, made if missing."""
    from pathlib import Path

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "PREEMPTED").write_text(f"{what}\n")


def clear_preempted(output_dir) -> None:
    """Remove a PREEMPTED left by an earlier stop (outside Slurm nothing else does): this run is under way."""
    from pathlib import Path

    (Path(output_dir) / "PREEMPTED").unlink(missing_ok=True)
