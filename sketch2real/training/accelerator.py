"""Accelerator setup: precision, gloo on CPU, trackers, DeepSpeed batch size, attention backend."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sketch2real.cli import UserError

logger = logging.getLogger("sketch2real")


def make_accelerator(opts, train_batch_size: int | None = None):
    """An `accelerate.Accelerator` for `opts` (a TrainOptions), usable on CUDA clusters and on CPU.

    On CPU the process group uses gloo, so DDP and DeepSpeed run with several CPU
    processes (tests). fp16 needs CUDA; bf16 autocast works on both.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if on_cpu and opts.mixed_precision == "fp16":
        raise UserError("--mixed_precision fp16 needs a CUDA device; use bf16 or no on CPU")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs_handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and distributed else []
    report_to = None if opts.report_to == "none" else opts.report_to
    accelerator = Accelerator(
        mixed_precision=opts.mixed_precision,
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=opts.output_dir, logging_dir=str(Path(opts.output_dir) / opts.logging_dir)),
        kwargs_handlers=kwargs_handlers,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # No DataLoader goes through prepare(): DeepSpeed cannot infer its micro batch size.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = train_batch_size or opts.train_batch_size
        plugin.deepspeed_config["gradient_accumulation_steps"] = opts.gradient_accumulation_steps
        if opts.max_grad_norm:
            plugin.deepspeed_config["gradient_clipping"] = opts.max_grad_norm
    if opts.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    return accelerator


def configure_attention(unet, opts, device: torch.device) -> None:
    """SDPA (diffusers' default) or xformers, which fails clearly off CUDA."""
    if opts.enable_xformers_memory_efficient_attention:
        if device.type != "cuda":
            raise UserError("--enable_xformers_memory_efficient_attention needs a CUDA device (xformers has no CPU kernels); "
                            "leave it off to use PyTorch SDPA")
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as err:  # xformers missing or built for another torch
            raise UserError(f"xformers attention unavailable: {str(err).splitlines()[0]}") from err


def is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


@contextmanager
def zero3_init_disabled(accelerator) -> Iterator[None]:
    """A context in which `from_pretrained` builds whole modules even under ZeRO-3.

    Under ZeRO-3, transformers' from_pretrained partitions parameters while loading
    (a collective, via the config accelerate registers): frozen modules used outside
    DeepSpeed, and loads done by rank 0 alone (saving), must not do that.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()
