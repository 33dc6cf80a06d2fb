"""Validation: fixed-seed images for prompts (a mosaic), and a held-out denoising loss that is
comparable across steps and runs (fixed samples, timesteps and noise)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
from PIL import Image

from sketch2real.mosaic import image_grid
from sketch2real.training.diffusion import Objective, derive_seed, encode_latents, vae_scale_factor


def heldout_denoising_loss(
    predict: Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor],
    vae, objective: Objective, images: torch.Tensor, prompts: Sequence[str], seed: int = 0, batch_size: int = 8,
) -> float:
    """Mean denoising loss (the `objective`'s) of `predict(noisy_latents, timesteps, prompts)` on fixed noise and timesteps.

    The noise and timesteps of sample i depend only on (seed, i), so the value is
    comparable between steps, stages and runs on the same held-out images.
    """
    latents = heldout_latents(vae, images, seed, batch_size)
    return float(heldout_denoising_losses(predict, objective, latents, prompts, seed, batch_size).mean())


def _heldout_noise(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """The posterior's noise and the denoising noise of held-out samples of latent `shape`, and the generator the
    timesteps are drawn from next: sample i's depend only on (seed, i)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "heldout"))
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), generator


def heldout_latents(vae, images: torch.Tensor, seed: int = 0, batch_size: int = 8) -> torch.Tensor:
    """Held-out images' scaled VAE latents (on the VAE's device), their posterior sampled with fixed noise: encoded
    once for every model a run compares (the VAE is frozen), not again at every validation and stage."""
    latent_side = images.shape[-1] // vae_scale_factor(vae)
    eps, _, _ = _heldout_noise((images.shape[0], vae.config.latent_channels, latent_side, latent_side), seed)
    return torch.cat([encode_latents(vae, images[start:start + batch_size], eps[start:start + batch_size])
                      for start in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def heldout_denoising_losses(
    predict: Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor],
    objective: Objective, latents: torch.Tensor, prompts: Sequence[str], seed: int = 0, batch_size: int = 8,
    device: torch.device | None = None,
) -> np.ndarray:
    """Each held-out sample's denoising MSE (`heldout_denoising_loss` is their mean) from its `heldout_latents`
    (moved to `device` a batch at a time): paired across models, so differences between models get intervals from a
    bootstrap over samples."""
    _, noise, generator = _heldout_noise(tuple(latents.shape), seed)
    timesteps = objective.draw_timesteps(latents.shape[0], generator)
    losses = []
    for start in range(0, latents.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        batch = latents[rows].to(device or latents.device)
        noisy, target = objective.noisy_and_target(batch, noise[rows], timesteps[rows])
        prediction = predict(noisy, timesteps[rows].to(noisy.device), list(prompts[rows]))
        losses += objective.loss(prediction, target, timesteps[rows]).float().cpu().tolist()
    return np.asarray(losses)


@torch.no_grad()
def decoding_in_vae_dtype(vae) -> AbstractContextManager:
    """The VAE decodes in its own dtype, autocast off, whatever the pipeline hands it. Under fp16 the VAE sits in
    fp32 (`vae_dtype`: SDXL's own overflows to NaN in fp16), which the validation's autocast would run in fp16 anyway
    (black images), and under DeepSpeed, whose autocast is off, the fp16 denoiser's latents met its fp32 weights (a
    crash, and the run's end lost with it)."""
    decode = vae.decode

    def in_own_dtype(latents: torch.Tensor, *args, **kwargs):
        with torch.autocast(latents.device.type, enabled=False):
            return decode(latents.to(vae.dtype), *args, **kwargs)

    return patch.object(vae, "decode", in_own_dtype)  # the class's method again after the block


def generate_rows(pipeline, prompts: Sequence[str], num_images: int, seed: int, resolution: int,
                  num_inference_steps: int, extra: dict | None = None,
                  between_prompts: Callable[[], None] | None = None) -> list[list[Image.Image]]:
    """One row per prompt, `num_images` fixed-seed images each; `extra`: call arguments (the trained family's
    `generation_kwargs`: its prompts' length, SDXL's time ids). `between_prompts` runs after each row (the preemption
    check)."""
    pipeline.set_progress_bar_config(disable=True)
    extra = extra or {}
    rows = []
    for p, prompt in enumerate(prompts):
        generators = [torch.Generator().manual_seed(derive_seed(seed, "validation", p, i)) for i in range(num_images)]
        rows.append(pipeline(prompt=[prompt] * num_images, height=resolution, width=resolution,
                             num_inference_steps=num_inference_steps, generator=generators, **extra).images)
        if between_prompts is not None:
            between_prompts()
    return rows


def save_mosaic(accelerator, rows: list[list[Image.Image]], cell: int, output_dir: str | Path, step: int) -> None:
    """The validation mosaic of `rows` at `output_dir/validation/step-NNNNNN.png` (written atomically by the main
    process) and on the tracker."""
    if accelerator.is_main_process:
        from sketch2real.io import atomic_path

        grid = image_grid(rows, cell=cell)
        with atomic_path(Path(output_dir) / "validation" / f"step-{step:06d}.png") as tmp:
            grid.save(tmp, format="PNG")
        log_image(accelerator, "validation", grid, step)


def log_image(accelerator, tag: str, image, step: int) -> None:
    """Send a PIL image to the tensorboard tracker, if there is one."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image)]}, step=step)

