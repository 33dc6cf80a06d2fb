"""The averaged weights a run validates and saves in place of the ones it steps: `--use_ema`'s moving average, and
schedule-free AdamW's average (`--optimizer adamw_schedulefree`).

Both live beside the fp32 master weights and are sharded as they are (`MasterWeights`): under DeepSpeed ZeRO each
process holds its partition of the masters (a flat tensor per parameter group: 1/N of the weights per process, on the
CPU with ZeRO-Offload), otherwise the trained parameters themselves (whole, as DDP keeps its optimizer state).
Validation and the saved model see the average by swapping it into the masters for a moment (`swapped_in`): the
low-precision weights DeepSpeed computes with are refreshed from them through its public API, so every reader of the
weights (the forward, `trained_state_dict`) sees the average without knowing about it, and training goes on from the
exact weights it left.

The EMA's decay follows diffusers' `EMAModel`: the k-th update averages with min(--ema_decay, k / (k + 9)) (0 at the
first, which starts the average at the trained weights), so short runs are not dominated by the starting weights and
a resumed run, knowing its step, continues the same sequence.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from sketch2real.cli import UserError
from sketch2real.training.accelerator import innermost_optimizer, is_deepspeed

# DeepSpeed's optimizers, and the attribute holding this process's fp32 master partitions (one flat tensor per group)
_MASTER_PARTITIONS = ("single_partition_of_fp32_groups",  # ZeRO-1/2
                      "fp32_partitioned_groups_flat",  # ZeRO-3 (its optimizer's groups are empty between steps)
                      "fp32_groups_flat_partition")  # DeepSpeed's bf16 optimizer (ZeRO-1 with fp32 gradient accumulation)


def ema_decay(base: float, update: int) -> float:
    """The decay of the `update`-th update (1-based): 0 for the first, then min(base, k / (k + 9))."""
    return 0.0 if update <= 1 else min(base, update / (update + 9))


def _master_partitions(optimizer) -> list[torch.Tensor]:
    inner = optimizer
    while inner is not None:
        for name in _MASTER_PARTITIONS:
            groups = getattr(inner, name, None)
            if groups is not None:
                if any(g is None or g.numel() == 0 for g in groups):  # ZeRO-3 NVMe: empty placeholders
                    raise UserError("averaged weights (--use_ema, schedule-free) are kept beside the fp32 master "
                                    "weights in memory: not with DeepSpeed's NVMe offload of the optimizer")
                return list(groups)
        inner = getattr(inner, "optimizer", None)
    # ZeRO-0 (DeepSpeed's fp16 optimizer, or none): the torch optimizer steps the masters in its groups
    return [p for group in innermost_optimizer(optimizer).param_groups for p in group["params"]]


class MasterWeights:
    """What this process's optimizer steps of a prepared model: DeepSpeed's fp32 master partitions, or the trained
    parameters; setting them also sets the low-precision copies DeepSpeed computes with."""

    def __init__(self, accelerator, model: torch.nn.Module, optimizer):
        self.accelerator = accelerator
        named = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
        self.trained = [p for _, p in named]
        self.deepspeed = is_deepspeed(accelerator)
        # the tensors the optimizer steps (and keys its state by) on this process: they stay valid (steps and loads
        # write in place); their names in checkpoints: the partition's group, or the parameters' (whole weights)
        self.tensors = _master_partitions(optimizer) if self.deepspeed else self.trained
        self.keys = [str(i) for i in range(len(self.tensors))] if self.deepspeed else [n for n, _ in named]

    @contextmanager
    def replaced_by(self, values: list[torch.Tensor]):
        """`values` in place of the masters for the block (on every process: a collective under DeepSpeed), the masters
        back, bit for bit, after it."""
        kept = [m.detach().clone() for m in self.tensors]
        self.set(values)
        try:
            yield
        finally:
            self.set(kept)

    @torch.no_grad()
    def set(self, values: list[torch.Tensor]) -> None:
        """`values` into the masters (a collective under DeepSpeed)."""
        for master, value in zip(self.tensors, values):
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


class EMAWeights:
    """`--use_ema`: the moving average of a prepared model's trained weights (see the module's docstring)."""

    trained_folder = "without_ema"  # where the final save puts the trained weights, beside the average

    def __init__(self, accelerator, model: torch.nn.Module, optimizer, decay: float):
        self.accelerator, self.decay = accelerator, decay
        self.masters = MasterWeights(accelerator, model, optimizer)
        self.average = [m.detach().float().clone() for m in self.masters.tensors]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based; also the update's number: a resume continues the sequence)."""
        weight = 1.0 - ema_decay(self.decay, step)
        masters = [m if m.dtype == torch.float32 else m.float() for m in self.masters.tensors]
        torch._foreach_lerp_(self.average, masters, weight)

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def file_name(self) -> str:
        """DeepSpeed: each process's partition (a ZeRO checkpoint resumes on as many processes); otherwise whole
        weights, written once, resumable on any number of processes."""
        return f"ema-{self.accelerator.process_index}.safetensors" if self.masters.deepspeed else "ema.safetensors"

    def save(self, folder: Path) -> None:
        """Write this process's average into a checkpoint folder (every process calls it)."""
        from safetensors.torch import save_file

        if self.masters.deepspeed or self.accelerator.is_main_process:
            save_file({k: a.contiguous().cpu() for k, a in zip(self.masters.keys, self.average)},
                      str(folder / self.file_name()))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        path = folder / self.file_name()
        if not path.is_file():
            raise UserError(f"cannot resume --use_ema from {folder}: no {path.name} (saved without --use_ema?)")
        saved = load_file(str(path))
        if [saved.get(k, torch.empty(0)).shape for k in self.masters.keys] != [a.shape for a in self.average]:
            raise UserError(f"{path} does not fit this run's trained weights")
        for k, a in zip(self.masters.keys, self.average):
            a.copy_(saved[k])

    def swapped_in(self):
        """The average in place of the trained weights for the block (on every process: a collective under
        DeepSpeed), the trained weights back after it."""
        return self.masters.replaced_by(self.average)

    def install(self) -> None:
        """The average in place of the trained weights for good (at the end: the model in memory is the one saved)."""
        self.masters.set(self.average)


class ScheduleFreeAverage:
    """Schedule-free AdamW's x, the weighted average of its iterates that it evaluates at: the optimizer steps y (an
    interpolation of x and its base iterate z) and keeps z in its state, so x = y + (1 - 1/beta1)(z - y), its
    `eval()`'s rule. Computed here from the masters and z rather than by `eval()`/`train()`, which move the parameters
    of the optimizer's groups: under ZeRO-3 those are empty between steps, and a round trip would not restore y bit
    for bit. Its state is the optimizer's, saved and resumed with it."""

    trained_folder = None  # y is not a model anyone loads: the final save is the average alone

    def __init__(self, accelerator, model: torch.nn.Module, optimizer):
        self.masters = MasterWeights(accelerator, model, optimizer)
        self.optimizer = innermost_optimizer(optimizer)
        self.optimizer.train()  # the mode it steps in (a checkpoint, saved while training, keeps it)

    def update(self, step: int) -> None:
        pass  # the optimizer's step updates x

    def save(self, folder: Path) -> None:
        pass  # in the optimizer's state

    def load(self, folder: Path) -> None:
        pass

    @torch.no_grad()
    def average(self) -> list[torch.Tensor]:
        """x on this process (its partitions under ZeRO); y (= x = z) where no step reached it yet."""
        zs = [self.optimizer.state.get(y, {}).get("z") for y in self.masters.tensors]
        if self.optimizer.param_groups[0]["k"] > 0 and all(z is None for z in zs):
            raise RuntimeError("schedule-free: the optimizer's state holds none of the weights it steps")
        beta1 = self.optimizer.param_groups[0]["betas"][0]
        return [y.detach().clone() if z is None else y.detach().lerp(z.to(y.device), 1 - 1 / beta1)
                for y, z in zip(self.masters.tensors, zs)]

    def swapped_in(self):
        """x in place of y for the block (on every process: a collective under DeepSpeed), y back after it."""
        return self.masters.replaced_by(self.average())

    def install(self) -> None:
        """x in place of y for good (at the end: the model in memory is the one saved)."""
        self.masters.set(self.average())


def averaged_weights(opts, accelerator, model: torch.nn.Module, optimizer) -> EMAWeights | ScheduleFreeAverage | None:
    """The average a run validates and saves (None: the trained weights themselves)."""
    if opts.use_ema:
        return EMAWeights(accelerator, model, optimizer, opts.ema_decay)
    if opts.optimizer == "adamw_schedulefree":
        return ScheduleFreeAverage(accelerator, model, optimizer)
    return None
