"""Host tensors onto the training device without making the host wait for it.

A plain `tensor.to("cuda")` from pageable memory waits until every kernel queued before it has run: one such copy
per step and the host can never run ahead of the GPU. These copy from page-locked memory asynchronously, or make a
per-step constant once per device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor.to(device, dtype)`, asynchronous for a host tensor going to a GPU (through page-locked memory)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, dtype)


@functools.lru_cache(maxsize=64)
def device_constant(make: Callable[..., torch.Tensor], *args, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`make(*args)` on `device` in `dtype`, made once and shared (callers must not write to it)."""
    return make(*args).to(device, dtype)
