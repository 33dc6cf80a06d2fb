"""The training objectives (denoising, flow matching), with noise that depends on the step and not on the world size.

Every random draw of a training step (VAE sample, noise, timestep) of global batch row r is made by a
generator seeded by (seed, stream, step, micro-step, r), on the rank's device: each rank draws only its
own rows, and 1, 2 or 8 processes see exactly the same numbers; a resumed run sees the same numbers
as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from sketch2real.family import Family


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (e.g. global seed, step, key); stable across runs and machines."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def drops_prompt(probability: float, *parts: object) -> bool:
    """Whether the prompt of the sample named by `parts` (seed, step, sample...) is replaced by "" (caption dropout,
    ControlNet's --proportion_empty_prompts): a function of those parts alone, on any number of processes and on
    resume, and drawn on the host (nothing read back from the device)."""
    return bool(probability) and derive_seed(*parts) % 10_000 < probability * 10_000


@dataclass
class StepNoise:
    """The random numbers of one micro-step, for this rank's rows of the global batch."""

    latent_eps: torch.Tensor  # VAE posterior sample noise
    noise: torch.Tensor  # diffusion noise
    timesteps: torch.Tensor


def step_noise(
    seed: int, step: int, micro: int, global_batch: int, rows: slice, latent_shape: tuple[int, ...],
    objective: Objective, noise_offset: float = 0.0, stream: str = "instance", device: torch.device | str = "cpu",
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
        timesteps.append(objective.draw_timesteps(1, generator, device))
    return StepNoise(torch.stack(eps), torch.stack(noise), torch.cat(timesteps))


def vae_scale_factor(vae) -> int:
    """How many pixels a latent spans per side (8 for every family's VAE), as diffusers' pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def scaled_latents(vae, raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the denoiser's latent space: (z - shift) * scale, the shift being the config's
    `shift_factor` (SD3/FLUX.1's 16-channel VAE; none for SD's). FLUX.2's VAE (`AutoencoderKLFlux2`) normalises by
    its batch-norm running statistics per channel of 2x2 patches instead, as its pipelines do; the result stays in
    the VAE's layout (the family's `predict` patchifies)."""
    statistics = getattr(vae, "bn", None)
    if statistics is not None:
        from diffusers import Flux2Pipeline

        mean = statistics.running_mean.view(1, -1, 1, 1).to(raw.device, raw.dtype)
        std = torch.sqrt(statistics.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(raw.device, raw.dtype)
        return Flux2Pipeline._unpatchify_latents((Flux2Pipeline._patchify_latents(raw) - mean) / std)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (raw - shift) * vae.config.scaling_factor


def encode_latents(vae, images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled VAE latents, sampling the posterior with the given noise."""
    with torch.no_grad():
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        latents = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)
    return scaled_latents(vae, latents).float()


class Objective(Protocol):
    """What a training objective decides: how timesteps are drawn, what the denoiser sees and regresses, the loss."""

    def draw_timesteps(self, count: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        """`count` training timesteps from `generator` (the denoiser's timestep values)."""

    def noisy_and_target(self, latents: torch.Tensor, noise: torch.Tensor,
                         timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the denoiser's input, its regression target)."""

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss, shape [B]."""

    def unweighted(self) -> Objective:
        """The same objective with uniform timesteps and no loss weighting (held-out losses comparable across runs)."""


@dataclass(frozen=True)
class DenoisingObjective:
    """DDPM training (SD 1.x/2.x, SDXL): integer timesteps drawn uniformly, the scheduler's noise, the epsilon or
    v target of its `prediction_type`; with `snr_gamma`, Min-SNR weighting (Hang et al., 2023)."""

    scheduler: Any  # a DDPMScheduler
    snr_gamma: float = 0.0

    def draw_timesteps(self, count: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (count,), generator=generator, device=device)

    def unweighted(self) -> DenoisingObjective:
        """The plain objective (uniform timesteps, unweighted MSE): what a held-out loss comparable across runs
        measures, whatever --snr_gamma trained with."""
        return DenoisingObjective(self.scheduler)

    def noisy_and_target(self, latents, noise, timesteps):
        noise, timesteps = noise.to(latents.device, latents.dtype), timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noisy, noise
        if kind == "v_prediction":
            return noisy, self.scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction type {kind!r}")

    def loss(self, prediction, target, timesteps):
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
        per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
        if self.snr_gamma:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.scheduler, timesteps.to(prediction.device))
            clamped = torch.clamp(snr, max=self.snr_gamma)
            weight = clamped / (snr + 1) if self.scheduler.config.prediction_type == "v_prediction" else clamped / snr
            per_sample = per_sample * weight
        return per_sample


class FlowMatchingObjective:
    """Rectified flow (SD3, FLUX): noisy = (1 - σ)·x + σ·noise, velocity target noise - x; σ drawn by diffusers'
    `compute_density_for_timestep_sampling` (logit_normal, mode, uniform) on the scheduler's (shifted) grid and the loss
    weighted by `compute_loss_weighting_for_sd3` (sigma_sqrt, cosmap, none), as diffusers' SD3/FLUX scripts."""

    def __init__(self, scheduler, weighting_scheme: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        self.scheduler, self.weighting_scheme = scheduler, weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        # the training grid (num_train_timesteps values, high to low, shifted as the model was trained), copied:
        # a pipeline's set_timesteps on the same scheduler would replace it by an inference grid
        self.grid = scheduler.timesteps.clone().float()
        self._grids: dict[torch.device, torch.Tensor] = {}  # the grid copied to each device once

    def draw_timesteps(self, count: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, count, self.logit_mean, self.logit_std,
                                                  self.mode_scale, device=device, generator=generator)
        indices = (u * len(self.grid)).long().clamp(0, len(self.grid) - 1)
        return self._grid_on(indices.device)[indices].to(device)

    def unweighted(self) -> FlowMatchingObjective:
        """The plain objective (uniform timesteps, unweighted MSE): what a held-out loss comparable across runs
        measures, whatever --weighting_scheme trained with."""
        import copy

        plain = copy.copy(self)  # the same training grid (the scheduler's may hold an inference grid by now)
        plain.weighting_scheme = "none"
        return plain

    def _grid_on(self, device: torch.device) -> torch.Tensor:
        """The grid on `device`, copied there once (indexing it there reads nothing back to the host)."""
        if device not in self._grids:
            self._grids[device] = self.grid.to(device)
        return self._grids[device]

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.scheduler.config.num_train_timesteps

    def noisy_and_target(self, latents, noise, timesteps):
        noise = noise.to(latents.device, latents.dtype)
        sigma = self.sigmas(timesteps.to(latents.device)).to(latents.dtype).view(-1, *[1] * (latents.ndim - 1))
        return (1 - sigma) * latents + sigma * noise, noise - latents

    def loss(self, prediction, target, timesteps):
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        weight = compute_loss_weighting_for_sd3(self.weighting_scheme, self.sigmas(timesteps.to(prediction.device)))
        squared = (prediction.float() - target.float()) ** 2
        return (weight.float().view(-1, *[1] * (squared.ndim - 1)) * squared).flatten(1).mean(1)


def objective_for(family: Family, scheduler, opts) -> Objective:
    """The objective `family` trains with, on its training scheduler (`Family.training_scheduler`), configured by
    `opts`."""
    if family.flow_matching:
        return FlowMatchingObjective(scheduler, opts.weighting_scheme, opts.logit_mean, opts.logit_std, opts.mode_scale)
    return DenoisingObjective(scheduler, opts.snr_gamma)


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids padded to `max_length` (default: the tokenizer's, CLIP's 77), as the pipelines pad them."""
    return tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
