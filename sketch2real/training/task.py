"""What DreamBooth, Textual Inversion and ControlNet share on top of the loop: the frozen parts,
the step's noisy latents, validation (held-out loss + mosaic) and the inference pipeline."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from sketch2real.family import SKETCHY_SIZE, Conditioning, TextEncoders, encode_prompt_ids
from sketch2real.models import SDComponents, assemble_pipeline, dtype_for, load_sd_components
from sketch2real.training.accelerator import cast_denoiser_inputs, configure_attention, zero3_init_disabled
from sketch2real.training.data import GlobalBatchSampler, LazyImages, StepLoader, default_num_workers, prefetched
from sketch2real.training.diffusion import (
    diffusion_loss,
    encode_latents,
    noisy_latents_and_target,
    step_noise,
    tokenize,
)
from sketch2real.training.latent_store import LatentStore, check_finite_posterior
from sketch2real.training.preemption import preemption
from sketch2real.training.validation import heldout_denoising_loss, log_image, validation_mosaic


def vae_dtype(vae, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: the weight dtype, except fp32 under fp16 for a VAE not known to be fp16-safe (its config's
    `force_upcast`, true for SDXL's own VAE, which overflows to NaN in fp16; false for madebyollin/sdxl-vae-fp16-fix),
    as diffusers' SDXL scripts keep it. bf16 has fp32's range: no overflow."""
    if weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", True):
        return torch.float32
    return weight_dtype


class PosteriorCache:
    """VAE posteriors (mean, std) of a training set, encoded once and sampled every step with the step's noise.

    Training is unchanged by it: the latent is mean + std * eps(seed, step), as without the cache.
    Images are encoded in fixed chunks (image i with the others of chunk i // CHUNK), so an image's
    posterior never depends on when it was first needed: resumed runs stay bit-identical.
    `encode` does the run's chunks up front, decoded ahead by DataLoader workers.
    Kept on the CPU in fp32: 2 x 4 x (resolution/8)² numbers per image (256 KiB at 512 px).
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
        decoded = prefetched(self.images, chunks, self._positions, num_workers, pin_memory)
        for chunk, images in tqdm(decoded, total=len(chunks), desc="caching latents", unit="chunk",
                                  disable=not progress or len(chunks) < 2, dynamic_ncols=True):
            preemption.check()  # hours at full scale: a signal stops it within a chunk
            dist = self.vae.encode(images.to(self.device, self.vae.dtype, non_blocking=True)).latent_dist
            check_finite_posterior(dist, self._positions(chunk), self.images, self.names)
            for j, i in enumerate(self._positions(chunk)):
                self.mean[i], self.std[i] = dist.mean[j].float().cpu(), dist.std[j].float().cpu()

    def latents(self, indices: list[int], eps: torch.Tensor) -> torch.Tensor:
        """Scaled latents of `indices` for this step's posterior noise `eps` (as `encode_latents` gives)."""
        self.encode(indices)
        mean = torch.stack([self.mean[i] for i in indices]).to(self.device)
        std = torch.stack([self.std[i] for i in indices]).to(self.device)
        return (mean + std * eps.to(self.device)) * self.vae.config.scaling_factor


class DiffusionTask:
    """Base of the trainers' tasks. Subclasses set `self.model` and say where the UNet and text encoder live."""

    model: torch.nn.Module
    heldout_images: torch.Tensor | None = None
    heldout_prompts: list[str] = []

    def __init__(self, opts, accelerator, components: SDComponents | None = None):
        self.opts, self.accelerator = opts, accelerator
        self.weight_dtype = dtype_for(accelerator.mixed_precision)
        with zero3_init_disabled(accelerator):
            self.c = components or load_sd_components(opts.pretrained_model_name_or_path, opts.revision, opts.variant,
                                                      opts.pretrained_vae_model_name_or_path)
        self.family = self.c.family
        configure_attention(self.c.unet, opts, accelerator.device)
        cast_denoiser_inputs(self.c.unet)
        self.c.vae.requires_grad_(False).to(accelerator.device, vae_dtype(self.c.vae, self.weight_dtype))
        side = opts.resolution // 2 ** (len(self.c.vae.config.block_out_channels) - 1)
        self.latent_shape = (self.c.vae.config.latent_channels, side, side)
        self.posteriors: dict[str, PosteriorCache | LatentStore] = {}
        self.cache_seconds = 0.0  # one-off VAE passes, kept out of samples/s
        self.image_names: dict[str, list[str]] = {}  # per stream, for messages about in-memory images
        self.loaders: dict[str, StepLoader] = {}
        self.num_workers = (opts.dataloader_num_workers if opts.dataloader_num_workers is not None
                            else default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))))
        self.pin_memory = accelerator.device.type == "cuda"

    # ---- subclasses ---------------------------------------------------------------------------------------------
    def unet_of(self, model):
        return self.c.unet

    def text_encoder_of(self, model):
        return self.c.text_encoder

    def prompt_transform(self, prompt: str) -> str:
        return prompt

    # ---- shared pieces ------------------------------------------------------------------------------------------
    def sampler(self, size: int, stream: str) -> GlobalBatchSampler:
        o = self.opts
        return GlobalBatchSampler(size, o.train_batch_size, self.accelerator.num_processes, self.accelerator.process_index,
                                  o.gradient_accumulation_steps, o.seed, stream)

    def step_rows(self, name: str, images, sampler: GlobalBatchSampler, step: int, micro: int) -> torch.Tensor:
        """This rank's rows of the step's global batch of `images`, decoded ahead of the step (`StepLoader`)."""
        if name not in self.loaders:
            self.loaders[name] = StepLoader(images, sampler, self.opts.max_train_steps, self.num_workers, self.pin_memory)
        return self.loaders[name].batch(step, micro).to(self.accelerator.device, non_blocking=True)

    def cache_stats(self) -> dict:
        """`latent_cache` of metrics.json: seconds spent building caches, and each on-disk store's figures."""
        return {"seconds": self.cache_seconds, "vae_dtype": str(self.c.vae.dtype),
                "stores": {k: v.stats for k, v in self.posteriors.items() if isinstance(v, LatentStore)}}

    def data_wait_seconds(self) -> float:
        """Time the training steps spent waiting for decoded images."""
        return sum(loader.wait_seconds for loader in self.loaders.values())

    def noisy_batch(self, images, sampler: GlobalBatchSampler, step: int, micro: int, stream: str):
        """(indices, noisy latents, target, timesteps) of this rank's rows of the step's global batch.

        With --cache_latents (the default) the posteriors of every image read from here to the end of the run
        are computed on the first call: a large (lazily decoded) set into the on-disk `LatentStore`, encoded by
        all ranks together; a small in-memory set into this rank's `PosteriorCache`.
        """
        sched = self.c.noise_scheduler
        indices = sampler.rank_indices(step, micro)
        draw = step_noise(self.opts.seed, step, micro, sampler.global_batch, sampler.rows, self.latent_shape,
                          sched.config.num_train_timesteps, self.opts.noise_offset, stream, self.accelerator.device)
        if self.opts.cache_latents:
            if stream not in self.posteriors:
                started = time.perf_counter()
                first, end = step * sampler.accumulation + micro, self.opts.max_train_steps * sampler.accumulation
                progress = self.accelerator.is_local_main_process
                if isinstance(images, LazyImages):
                    store = LatentStore(self.opts.latent_cache_dir or Path(self.opts.output_dir) / "latent_cache",
                                        self.c.vae, images, self.accelerator.device)
                    store.build(self.accelerator, sampler.global_indices_between(first, end), self.num_workers,
                                self.pin_memory, progress)
                    self.posteriors[stream] = store
                else:
                    cache = self.posteriors[stream] = PosteriorCache(self.c.vae, images, self.accelerator.device,
                                                                     self.image_names.get(stream))
                    cache.encode(sampler.rank_indices_between(first, end), self.num_workers, self.pin_memory, progress)
                self.cache_seconds += time.perf_counter() - started
            latents = self.posteriors[stream].latents(indices, draw.latent_eps)
        else:
            latents = encode_latents(self.c.vae, self.step_rows(stream, images, sampler, step, micro), draw.latent_eps)
        noisy, target = noisy_latents_and_target(sched, latents, draw.noise, draw.timesteps)
        return indices, noisy, target, draw.timesteps.to(noisy.device)

    def loss_of(self, prediction, target, timesteps) -> torch.Tensor:
        return diffusion_loss(prediction, target, timesteps, self.c.noise_scheduler, self.opts.snr_gamma).mean()

    def prompt_ids(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of the prompts, one tensor per tokenizer of the family."""
        prompts = [self.prompt_transform(p) for p in prompts]
        return [tokenize(tokenizer, prompts).to(self.accelerator.device) for tokenizer in self.c.tokenizers]

    def condition(self, prompts: list[str], text_encoder=None) -> Conditioning:
        """Prompts -> the UNet's conditioning (`sketch2real.family`). `text_encoder` stands in for the first encoder
        (one being trained, or with Textual Inversion's rows), or is a (wrapped) `TextEncoders` holding them all."""
        ids = self.prompt_ids(prompts)
        if text_encoder is not None and isinstance(self.accelerator.unwrap_model(text_encoder), TextEncoders):
            return TextEncoders.conditioning(text_encoder(ids))
        encoders = [text_encoder or self.c.text_encoder, *self.c.text_encoders[1:]]
        return encode_prompt_ids(self.family, encoders, ids, self.opts.resolution, SKETCHY_SIZE)

    def samples_per_step(self) -> int:
        o = self.opts
        return o.train_batch_size * self.accelerator.num_processes * o.gradient_accumulation_steps

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def predictor(self, model):
        """(noisy, timesteps, prompts) -> prediction with the current weights (held-out losses)."""
        unet, text_encoder = self.unet_of(model), self.text_encoder_of(model)

        def predict(noisy, timesteps, prompts):
            with self.accelerator.autocast():
                return unet(noisy, timesteps, **self.condition(prompts, text_encoder).unet_kwargs()).sample

        return predict

    def pipeline(self, model):
        """A generation pipeline of the model's family with the current weights (validation images)."""
        from diffusers import PNDMScheduler

        scheduler = PNDMScheduler.from_config(self.c.noise_scheduler.config, skip_prk_steps=True)
        return assemble_pipeline(self.c, self.unet_of(model), self.text_encoder_of(model), scheduler)

    def validation_prompts(self) -> list[str]:
        return list(self.opts.validation_prompt)

    def validate(self, accelerator, model, step: int) -> dict[str, float]:
        """Held-out loss and a mosaic; a preemption signal stops it between pieces, on every process together."""
        opts, logs = self.opts, {}
        stop_if_preempted = lambda: preemption.check(accelerator)  # noqa: E731
        stop_if_preempted()
        model.eval()
        if self.heldout_images is not None:
            logs["heldout_loss"] = heldout_denoising_loss(self.predictor(model), self.c.vae, self.c.noise_scheduler,
                                                          self.heldout_images, self.heldout_prompts, opts.seed)
            stop_if_preempted()
        prompts = [self.prompt_transform(p) for p in self.validation_prompts()]
        if opts.num_validation_images and prompts:
            folder = Path(opts.output_dir) / "validation"
            tmp = folder / f".rank{accelerator.process_index}.png"
            with accelerator.autocast():
                grid, rows = validation_mosaic(self.pipeline(model), prompts, opts.num_validation_images, opts.seed,
                                               opts.resolution, opts.validation_inference_steps, tmp,
                                               between_prompts=stop_if_preempted)
            if accelerator.is_main_process:
                tmp.replace(folder / f"step-{step:06d}.png")
                log_image(accelerator, "validation", grid, step)
            else:
                tmp.unlink(missing_ok=True)
            categories = self.validation_categories()
            logs.update(self.style_scores([image for row in rows for image in row],
                                          [c for c, row in zip(categories, rows) for _ in row]))
        model.train()
        return logs

    def validation_categories(self) -> list[str | None]:
        """The category each validation prompt asks for (None: not known; no content accuracy for its images)."""
        return [None] * len(self.validation_prompts())

    def style_scores(self, images: list, categories: list[str | None]) -> dict[str, float]:
        """Sketchiness and content accuracy of validation images (`--validation_clip_model_name_or_path`), on the
        main process; every process calls it (fitting the probe is a collective, the first time)."""
        opts = self.opts
        if not opts.validation_clip_model_name_or_path:
            return {}
        from sketch2real.training.style_monitor import style_monitor

        monitor = style_monitor(opts.validation_clip_model_name_or_path, opts.shard_dir, opts.validation_probe_samples,
                                opts.seed, self.accelerator, opts.output_dir)
        return monitor.score(images, categories) if monitor is not None else {}

    def on_checkpoint(self, accelerator, model, step: int) -> None:
        pass
