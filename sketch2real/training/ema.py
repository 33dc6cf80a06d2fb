"""`--use_ema`: an exponential moving average of the trained weights, kept beside the fp32 master weights and
sharded as they are.

Each process averages exactly what its optimizer steps: under DeepSpeed ZeRO its partition of the fp32 masters (a
flat tensor per parameter group: 1/N of the weights per process, on the CPU with ZeRO-Offload), otherwise the
trained parameters themselves (whole, as DDP keeps its optimizer state). One fused update per step, no
communication. Validation and the saved model see the average by swapping it into the masters for a moment
(`swapped_in`): the low-precision weights DeepSpeed computes with are refreshed from them through its public API, so
every reader of the weights (the forward, `trained_state_dict`) sees the average without knowing about it.

The decay follows diffusers' `EMAModel`: the k-th update averages with min(--ema_decay, k / (k + 9)) (0 at the first,
which starts the average at the trained weights), so short runs are not dominated by the starting weights and a
resumed run, knowing its step, continues the same sequence.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from sketch2real.cli import UserError
from sketch2real.training.accelerator import is_deepspeed

# DeepSpeed's optimizers, and the attribute holding this process's fp32 master partitions (one flat tensor per group)
_MASTER_PARTITIONS = ("single_partition_of_fp32_groups",  # ZeRO-1/2
                      "fp32_partitioned_groups_flat",  # ZeRO-3
                      "fp32_groups_flat_partition")  # DeepSpeed's bf16 optimizer (ZeRO-0)


def ema_decay(base: float, update: int) -> float:
    """The decay of the `update`-th update (1-based): 0 for the first, then min(base, k / (k + 9))."""
    return 0.0 if update <= 1 else min(base, update / (update + 9))


def _master_partitions(optimizer) -> list[torch.Tensor]:
    inner = optimizer
    while inner is not None:
        for name in _MASTER_PARTITIONS:
            groups = getattr(inner, name, None)
            if groups is not None:
                if any(g is None for g in groups):
                    raise UserError("--use_ema averages the fp32 master weights in memory: not with DeepSpeed's NVMe "
                                    "offload of the optimizer")
                return list(groups)
        inner = getattr(inner, "optimizer", None)
    raise RuntimeError(f"--use_ema: no fp32 master partitions found in DeepSpeed's optimizer ({type(optimizer).__name__})")


class EMAWeights:
    """The moving average of a prepared model's trained weights (see the module's docstring)."""

    def __init__(self, accelerator, model: torch.nn.Module, optimizer, decay: float):
        self.accelerator, self.model, self.decay = accelerator, model, decay
        named = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
        self.trained = [p for _, p in named]
        self.deepspeed = is_deepspeed(accelerator)
        # the tensors the optimizer steps on this process: views that stay valid (steps and loads write in place);
        # their names in checkpoints: the parameters' (whole weights), or the partition's group
        self.masters = _master_partitions(optimizer) if self.deepspeed else [p.data for p in self.trained]
        self.keys = [str(i) for i in range(len(self.masters))] if self.deepspeed else [n for n, _ in named]
        self.average = [m.detach().float().clone() for m in self.masters]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based; also the update's number: a resume continues the sequence)."""
        weight = 1.0 - ema_decay(self.decay, step)
        masters = [m if m.dtype == torch.float32 else m.float() for m in self.masters]
        torch._foreach_lerp_(self.average, masters, weight)

    def numel(self) -> int:
        """Elements this process averages (the share it holds)."""
        return sum(a.numel() for a in self.average)

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def file_name(self) -> str:
        """DeepSpeed: each process's partition (a ZeRO checkpoint resumes on as many processes); otherwise whole
        weights, written once, resumable on any number of processes."""
        return f"ema-{self.accelerator.process_index}.safetensors" if self.deepspeed else "ema.safetensors"

    def save(self, folder: Path) -> None:
        """Write this process's average into a checkpoint folder (every process calls it)."""
        from safetensors.torch import save_file

        if self.deepspeed or self.accelerator.is_main_process:
            save_file({k: a.contiguous().cpu() for k, a in zip(self.keys, self.average)}, str(folder / self.file_name()))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        path = folder / self.file_name()
        if not path.is_file():
            raise UserError(f"cannot resume --use_ema from {folder}: no {path.name} (saved without --use_ema?)")
        saved = load_file(str(path))
        if [saved.get(k, torch.empty(0)).shape for k in self.keys] != [a.shape for a in self.average]:
            raise UserError(f"{path} does not fit this run's trained weights")
        for k, a in zip(self.keys, self.average):
            a.copy_(saved[k])

    # ---- reading the average ------------------------------------------------------------------------------------
    @contextmanager
    def swapped_in(self):
        """The average in place of the trained weights for the block (on every process: a collective under
        DeepSpeed), the trained weights back after it."""
        kept = [m.detach().clone() for m in self.masters]
        self._set_masters(self.average)
        try:
            yield
        finally:
            self._set_masters(kept)

    @torch.no_grad()
    def _set_masters(self, values: list[torch.Tensor]) -> None:
        for master, value in zip(self.masters, values):
            master.copy_(value)
        if self.deepspeed:
            self._refresh_low_precision()

    @torch.no_grad()
    def _refresh_low_precision(self) -> None:
        """DeepSpeed computes with low-precision copies of the masters (whole under ZeRO-1/2, partitioned under
        ZeRO-3): set them from the masters just written, as its step does."""
        from deepspeed import zero
        from deepspeed.utils import safe_get_full_fp32_param

        for param in self.trained:
            full = safe_get_full_fp32_param(param)  # a collective: every process's partition
            if hasattr(param, "ds_id"):  # ZeRO-3: gathered, set, partitioned again
                with zero.GatheredParameters([param], modifier_rank=0):
                    if self.accelerator.is_main_process:
                        param.data.copy_(full.view_as(param))
            else:
                param.data.copy_(full.view_as(param))
