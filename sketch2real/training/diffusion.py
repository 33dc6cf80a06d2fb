"""The diffusion training objective, with noise that depends on the step and not on the world size.

Every random draw of a training step (VAE sample, noise, timestep) of global batch row r is made by a
generator seeded by (seed, stream, step, micro-step, r), on the rank's device: each rank draws only its
own rows, and 1, 2 or 8 processes see exactly the same numbers; a resumed run sees the same numbers
as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (e.g. global seed, step, key); stable across runs and machines."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)


@dataclass
class StepNoise:
    """The random numbers of one micro-step, for this rank's rows of the global batch."""

    latent_eps: torch.Tensor  # VAE posterior sample noise
    noise: torch.Tensor  # diffusion noise
    timesteps: torch.Tensor


def step_noise(
    seed: int, step: int, micro: int, global_batch: int, rows: slice, latent_shape: tuple[int, ...],
    num_train_timesteps: int, noise_offset: float = 0.0, stream: str = "instance", device: torch.device | str = "cpu",
) -> StepNoise:
    """This rank's `rows` of the step's global batch of random numbers, each row from its own generator on `device`."""
    eps, noise, timesteps = [], [], []
    for row in range(rows.start, min(rows.stop, global_batch)):
        generator = torch.Generator(device).manual_seed(derive_seed(seed, stream, step, micro, row))
        eps.append(torch.randn(latent_shape, generator=generator, device=device))
        row_noise = torch.randn(latent_shape, generator=generator, device=device)
        if noise_offset:
            row_noise = row_noise + noise_offset * torch.randn((latent_shape[0], 1, 1), generator=generator, device=device)
        noise.append(row_noise)
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator, device=device))
    return StepNoise(torch.stack(eps), torch.stack(noise), torch.cat(timesteps))


def encode_latents(vae, images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled VAE latents, sampling the posterior with the given noise."""
    with torch.no_grad():
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        latents = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)
    return (latents * vae.config.scaling_factor).float()


def noisy_latents_and_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """(noisy latents, regression target) for the scheduler's prediction type."""
    noise = noise.to(latents.device, latents.dtype)
    timesteps = timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {kind!r}")
    return noisy, target


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                   snr_gamma: float = 0.0) -> torch.Tensor:
    """Per-sample MSE (shape [B]); with `snr_gamma`, Min-SNR weighted (Hang et al., 2023)."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps.to(prediction.device))
        weight = torch.clamp(snr, max=snr_gamma) / snr
        if noise_scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=snr_gamma) / (snr + 1)
        per_sample = per_sample * weight
    return per_sample


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP hidden states of the prompts (padded to the tokenizer's max length, as SD does)."""
    ids = tokenize(tokenizer, prompts).to(device)
    return text_encoder(ids)[0]


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
