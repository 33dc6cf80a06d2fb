"""The data stream of a trainer: each (step, micro-step)'s samples, their noise and timesteps, their latents (cached),
and what the objective makes of them (noisy latents, target).

A `DiffusionStream` owns one set of training images and its sampler; `prepare` builds its latent cache before the
loop's clock starts (its seconds are reported apart); `batch(step, micro)` gives this rank's rows. Every random
number is a function of (seed, stream, step, micro, row): any number of processes, and a resumed run, see the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sketch2real.device import to_device
from sketch2real.training.data import GlobalBatchSampler, LazyImages, StepLoader, prefetched
from sketch2real.training.diffusion import Objective, encode_latents, scaled_latents, step_noise
from sketch2real.training.latent_store import LatentStore, check_finite_posterior, encode_posterior
from sketch2real.training.preemption import preemption


class PosteriorCache:
    """VAE posteriors (mean, std) of a small in-memory training set, encoded once and sampled every step with the
    step's noise.

    Training is unchanged by it: the latent is mean + std * eps(seed, step), as without the cache.
    Images are encoded in fixed chunks (image i with the others of chunk i // CHUNK), so an image's
    posterior never depends on when it was first needed: resumed runs stay bit-identical.
    Kept on the device in fp32, so a step reads its rows without a host copy: 2 x 4 x (resolution/8)² numbers per
    image (256 KiB at 512 px; the images themselves, in host memory, are 12x that).
    """

    CHUNK = 8

    def __init__(self, vae, images, device: torch.device, names: list[str] | None = None):
        self.vae, self.images, self.device, self.names = vae, images, device, names
        self.mean: dict[int, torch.Tensor] = {}
        self.std: dict[int, torch.Tensor] = {}

    def _positions(self, chunk: int) -> list[int]:
        return list(range(chunk * self.CHUNK, min((chunk + 1) * self.CHUNK, len(self.images))))

    @torch.no_grad()
    def encode(self, indices: list[int], num_workers: int = 0, pin_memory: bool = False, progress: bool = False) -> None:
        """Encode the chunks holding `indices` that are not cached yet."""
        from tqdm.auto import tqdm

        chunks = sorted({i // self.CHUNK for i in indices if i not in self.mean})  # chunks are cached whole
        if not chunks:  # every step once the cache is built: no DataLoader to start
            return
        decoded = prefetched(self.images, chunks, self._positions, num_workers, pin_memory)
        for chunk, images in tqdm(decoded, total=len(chunks), desc="caching latents", unit="chunk",
                                  disable=not progress or len(chunks) < 2, dynamic_ncols=True):
            preemption.check()  # hours at full scale: a signal stops it within a chunk
            dist = encode_posterior(self.vae, images, self.device)
            check_finite_posterior(dist, self._positions(chunk), self.images, self.names)
            mean, std = dist.mean.float(), dist.std.float()
            for j, i in enumerate(self._positions(chunk)):
                self.mean[i], self.std[i] = mean[j].clone(), std[j].clone()

    def latents(self, indices: list[int], eps: torch.Tensor) -> torch.Tensor:
        """Scaled latents of `indices` for this step's posterior noise `eps` (as `encode_latents` gives)."""
        self.encode(indices)
        mean = torch.stack([self.mean[i] for i in indices])
        std = torch.stack([self.std[i] for i in indices])
        return scaled_latents(self.vae, mean + std * eps.to(self.device))


@dataclass(frozen=True)
class StreamSetup:
    """What every stream of a run shares: the run's options, the VAE and objective, and how images are read."""

    opts: object  # TrainOptions
    accelerator: object
    vae: object
    objective: Objective
    latent_shape: tuple[int, ...]
    num_workers: int
    pin_memory: bool


@dataclass
class NoisyBatch:
    """This rank's rows of a (step, micro-step): which images, the denoiser's input, its target and timesteps, and
    where the stream knows it (a folder's images), each image's `crop_geometry` (else: Sketchy's, uncropped)."""

    indices: list[int]
    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    geometry: torch.Tensor | None = None


class DiffusionStream:
    """One set of training images (`name` seeds its sampler and noise) -> each micro-step's `NoisyBatch`.

    With --cache_latents (the default) `prepare` encodes every image read from the start step to the end of the
    run: a large (lazily decoded) set into the on-disk `LatentStore`, encoded by all ranks together (a collective);
    a small in-memory set into this rank's `PosteriorCache`. Without it, each step's images are decoded ahead by
    DataLoader workers and encoded in the step.
    """

    def __init__(self, name: str, images, setup: StreamSetup, names: list[str] | None = None,
                 geometry: torch.Tensor | None = None):
        o, accelerator = setup.opts, setup.accelerator
        self.name, self.images, self.setup, self.names, self.geometry = name, images, setup, names, geometry
        self.sampler = GlobalBatchSampler(len(images), o.train_batch_size, accelerator.num_processes,
                                          accelerator.process_index, o.gradient_accumulation_steps, o.seed, name)
        self.posteriors: PosteriorCache | LatentStore | None = None
        self.loaders: dict[int, StepLoader] = {}  # per image set read in step with this stream (id of the set)
        self.cache_seconds = 0.0

    def __len__(self) -> int:
        return len(self.images)

    def prepare(self, start_step: int) -> None:
        """Build the latent cache for the steps from `start_step` on (every rank calls it)."""
        s, o = self.setup, self.setup.opts
        if not o.cache_latents or self.posteriors is not None:
            return
        started = time.perf_counter()
        first, end = start_step * self.sampler.accumulation, o.max_train_steps * self.sampler.accumulation
        progress = s.accelerator.is_local_main_process
        if isinstance(self.images, LazyImages):
            store = LatentStore(o.latent_cache_dir or Path(o.output_dir) / "latent_cache", s.vae, self.images,
                                s.accelerator.device)
            store.build(s.accelerator, self.sampler.global_indices_between(first, end), s.num_workers, s.pin_memory,
                        progress)
            self.posteriors = store
        else:
            self.posteriors = PosteriorCache(s.vae, self.images, s.accelerator.device, self.names)
            self.posteriors.encode(self.sampler.rank_indices_between(first, end), s.num_workers, s.pin_memory, progress)
        self.cache_seconds += time.perf_counter() - started

    def rows(self, step: int, micro: int, images=None) -> torch.Tensor:
        """This rank's rows of the step's global batch of `images` (default: the stream's; or another set indexed
        alike, e.g. the sketches of ControlNet's pairs), decoded ahead of the step (`StepLoader`)."""
        images = self.images if images is None else images
        s = self.setup
        if id(images) not in self.loaders:
            self.loaders[id(images)] = StepLoader(images, self.sampler, s.opts.max_train_steps, s.num_workers, s.pin_memory)
        return self.loaders[id(images)].batch(step, micro).to(s.accelerator.device, non_blocking=True)

    def batch(self, step: int, micro: int) -> NoisyBatch:
        """This rank's rows of the step's global batch: the objective's noisy latents and target."""
        s, o = self.setup, self.setup.opts
        indices = self.sampler.rank_indices(step, micro)
        draw = step_noise(o.seed, step, micro, self.sampler.global_batch, self.sampler.rows, s.latent_shape, s.objective,
                          o.noise_offset, self.name, s.accelerator.device)
        if o.cache_latents:
            self.prepare(step)  # a no-op when the loop prepared it
            latents = self.posteriors.latents(indices, draw.latent_eps)
        else:
            latents = encode_latents(s.vae, self.rows(step, micro), draw.latent_eps)
        noisy, target = s.objective.noisy_and_target(latents, draw.noise, draw.timesteps)
        geometry = to_device(self.geometry[indices], noisy.device) if self.geometry is not None else None
        return NoisyBatch(indices, noisy, target, draw.timesteps.to(noisy.device), geometry)

    @property
    def wait_seconds(self) -> float:
        """Time the training steps spent waiting for decoded images."""
        return sum(loader.wait_seconds for loader in self.loaders.values())

    @property
    def store_stats(self) -> dict | None:
        return self.posteriors.stats if isinstance(self.posteriors, LatentStore) else None
