"""What DreamBooth, Textual Inversion and ControlNet share on top of the loop: the frozen parts, the objective, the
data streams, validation (held-out loss + mosaic) and the inference pipeline, and the collective-then-main-writes
pattern of every saved artifact.

A trainer is three parts: its data **streams** (`DiffusionStream`: each step's noisy latents and targets), the
**objective** (the family's: `Family.predict` for the denoiser call, `training.diffusion` for the target and loss)
and its **artifacts** (`save_final`, `on_checkpoint`, written through `write_on_main`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sketch2real.cli import UserError
from sketch2real.device import to_device
from sketch2real.family import Conditioning, Family, TextEncoders, family_of
from sketch2real.models import (
    SDComponents,
    assemble_pipeline,
    check_model_path,
    dtype_for,
    free_device_memory,
    load_sd_components,
    load_text_encoders,
)
from sketch2real.training.accelerator import (
    cast_denoiser_inputs,
    compile_in_place,
    configure_attention,
    eager_mode,
    trained_state_dict,
    zero3_embeddings_gathered,
    zero3_init_disabled,
)
from sketch2real.training.data import default_num_workers
from sketch2real.training.diffusion import objective_for, vae_scale_factor
from sketch2real.training.preemption import preemption
from sketch2real.training.stream import DiffusionStream, NoisyBatch, StreamSetup
from sketch2real.training.validation import (
    decoding_in_vae_dtype,
    generate_rows,
    heldout_denoising_losses,
    heldout_latents,
    save_mosaic,
)


def vae_dtype(vae, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: the weight dtype, except fp32 under fp16 for a VAE not known to be fp16-safe (its config's
    `force_upcast`, true for SDXL's own VAE, which overflows to NaN in fp16; false for madebyollin/sdxl-vae-fp16-fix),
    as diffusers' SDXL scripts keep it. bf16 has fp32's range: no overflow."""
    if weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", True):
        return torch.float32
    return weight_dtype


@dataclass
class HeldOut:
    """Held-out samples of a trainer's validation: images in [-1, 1] (until encoded into `latents`, once: the VAE is
    frozen) with their prompts, and where known their categories, keys and conditioning images (ControlNet's
    sketches)."""

    images: torch.Tensor | None
    prompts: list[str]
    categories: list[str] | None = None
    keys: list[str] | None = None
    conditions: torch.Tensor | None = None
    latents: torch.Tensor | None = None  # `validation.heldout_latents` of the images, at the first validation

    def __len__(self) -> int:
        return len(self.prompts)

    def photos(self) -> list[str] | None:
        """Each sample's photo (`sketchy.photo_key` of its key), where keys are known: a photo's ~6
        sketches are not independent samples, and intervals over them are clustered by it (`metrics.mean_ci95`)."""
        from sketch2real.sketchy import photo_key

        return [photo_key(k) for k in self.keys] if self.keys else None


def no_heldout(err: UserError, split: str) -> None:
    """Said, not silent: a run whose held-out samples cannot be read (an empty validation split: a small release's
    --val_fraction rounds to no photo) has no held-out loss in metrics.json or its card."""
    logging.getLogger("sketch2real").warning("no held-out loss: %s (--validation_split %s)", err, split)


class DiffusionTask:
    """Base of the trainers' tasks. Subclasses set `self.model` and say where the denoiser and text encoder live."""

    model: torch.nn.Module
    heldout: HeldOut | None = None
    frozen_conditions: dict[str, Conditioning] | None = None  # prompt -> conditioning, once the encoders are released
    trainer: str  # the name `Family.trainers` lists where this trainer is built for a family

    def __init__(self, opts, accelerator, components: SDComponents | None = None):
        self.opts, self.accelerator = opts, accelerator
        # refused in one line before any weight is loaded (a 12B transformer takes minutes)
        if components is None:
            check_model_path(opts.pretrained_model_name_or_path)
        family = components.family if components else family_of(opts.pretrained_model_name_or_path, opts.revision)
        family = family.with_max_sequence_length(opts.max_sequence_length).with_own_images(bool(self.data_source()[0]))
        family.require(self.trainer)
        self.refuse(family)
        self.check_data()
        self.weight_dtype = dtype_for(accelerator.mixed_precision)
        with zero3_init_disabled(accelerator):
            self.c = components or load_sd_components(
                opts.pretrained_model_name_or_path, opts.revision, opts.variant, opts.pretrained_vae_model_name_or_path,
                frozen_dtype=self.weight_dtype, keep_full_precision=self.full_precision_components(family))
        self.c.family = self.family = family  # with the run's prompt length: tokenizing, validation, the card
        configure_attention(self.c.denoiser, opts, accelerator.device)
        cast_denoiser_inputs(self.c.denoiser)
        self.c.vae.requires_grad_(False).to(accelerator.device, vae_dtype(self.c.vae, self.weight_dtype))
        side = opts.resolution // vae_scale_factor(self.c.vae)
        self.objective = objective_for(family, self.c.noise_scheduler, opts)
        num_workers = (opts.dataloader_num_workers if opts.dataloader_num_workers is not None
                       else default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))))
        self.stream_setup = StreamSetup(opts, accelerator, self.c.vae, self.objective,
                                        (self.c.vae.config.latent_channels, side, side), num_workers,
                                        accelerator.device.type == "cuda")
        self.streams: dict[str, DiffusionStream] = {}

    # ---- subclasses ---------------------------------------------------------------------------------------------
    def data_source(self) -> tuple[str, list[str]]:
        """Where the training images come from: (an image folder, []), or ("", the categories read from --shard_dir;
        [] for all)."""
        return "", list(getattr(self.opts, "categories", []) or [])

    def check_data(self) -> None:
        """The training data's one-line errors (shards, split, a misspelt category, an empty image folder) before any
        weight loads: they came after the model, minutes for a 12B transformer on every rank."""
        from sketch2real.shards import image_files, sample_refs

        folder, categories = self.data_source()
        if folder:
            image_files(folder)  # its one-line errors
        elif getattr(self.opts, "shard_dir", ""):
            sample_refs(self.opts.shard_dir, self.opts.split, categories or None)

    def refuse(self, family: Family) -> None:
        """One line (a `UserError`) for what these options ask that `family` does not have, before any weight loads."""
        if self.accelerator.mixed_precision == "fp16" and not family.fp16:
            raise UserError(f"{family.name} models train in bf16, not fp16 (their activations overflow fp16): use "
                            "--mixed_precision bf16")
        flow = family.flow_matching
        if flow and self.opts.snr_gamma:
            raise UserError(f"--snr_gamma weighs denoising (epsilon/v) losses; {family.name} models train by flow "
                            "matching: use --weighting_scheme")
        if not flow and self.opts.weighting_scheme != "none":
            raise UserError(f"--weighting_scheme {self.opts.weighting_scheme} is for flow-matching families (SD3, FLUX); "
                            f"{family.name} models: --snr_gamma")
        if self.opts.resolution % family.resolution_multiple:
            raise UserError(f"--resolution {self.opts.resolution}: {family.name} models take a multiple of "
                            f"{family.resolution_multiple} (their latents are cut into 2x2 patches)")

    def full_precision_components(self, family: Family) -> set[str]:
        """Components loaded in fp32 (what trains, or what trained weights are copied from; "denoiser" for the
        family's); the others are loaded straight in the weight dtype."""
        return {"denoiser", *family.text_encoders}

    def denoiser_of(self, model):
        return self.c.denoiser

    def text_encoder_of(self, model):
        return self.c.text_encoder

    def prompt_transform(self, prompt: str) -> str:
        return prompt

    def user_prompt(self, prompt: str) -> str:
        """`prompt` as a user writes it for a pipeline with the run's new tokens loaded (Textual Inversion's `<t>`,
        pivotal tuning's `<s0>`), where `prompt_transform` spells them out as training reads them."""
        return prompt

    def pipeline_prompt(self, pipe, prompt: str) -> str:
        """`prompt` as the validation pipeline must be given it to condition as training did: written as a user
        writes it, which diffusers' loader in the pipeline spells out itself (spelt out here first, every name was
        expanded again: validation drew a prompt never trained); SD3's pipelines, without one, spelt out here."""
        from sketch2real.family import spell_out_tokens

        return spell_out_tokens(pipe, self.user_prompt(prompt))

    def compiled_modules(self) -> list[torch.nn.Module]:
        """What --torch_compile compiles: the modules that run every step (the denoiser; ControlNet adds its own)."""
        return [self.c.denoiser]

    def compile(self) -> None:
        """--torch_compile, called by the loop once the model is complete (LoRA adapters added) and before its
        first step."""
        o = self.opts
        compile_in_place(self.compiled_modules(), self.family.compile_regions, o.torch_compile_mode, o.torch_compile_backend)

    # ---- shared pieces ------------------------------------------------------------------------------------------
    def stream(self, name: str, images, names: list[str] | None = None,
               geometry: torch.Tensor | None = None) -> DiffusionStream:
        """A data stream of this run over `images` (`names`: for messages about in-memory images; `geometry`: a
        folder's images' `crop_geometry`)."""
        self.streams[name] = DiffusionStream(name, images, self.stream_setup, names, geometry)
        return self.streams[name]

    def prepare_data(self, start_step: int) -> None:
        """Build every stream's latent cache before the clock starts (a collective for on-disk caches)."""
        for stream in self.streams.values():
            stream.prepare(start_step)

    def cache_stats(self) -> dict:
        """`latent_cache` of metrics.json: seconds spent building caches, and each on-disk store's figures."""
        return {"seconds": sum(s.cache_seconds for s in self.streams.values()), "vae_dtype": str(self.c.vae.dtype),
                "stores": {k: s.store_stats for k, s in self.streams.items() if s.store_stats is not None}}

    def data_wait_seconds(self) -> float:
        """Time the training steps spent waiting for decoded images."""
        return sum(stream.wait_seconds for stream in self.streams.values())

    def predict(self, denoiser, batch: NoisyBatch, text: Conditioning, **control) -> torch.Tensor:
        """The family's denoiser call on a batch (`control`: a ControlNet and its conditioning image)."""
        return self.family.predict(denoiser, batch.noisy, batch.timesteps, text, guidance=self.opts.guidance_scale,
                                   geometry=batch.geometry, **control)

    def loss_of(self, batch: NoisyBatch, prediction: torch.Tensor) -> torch.Tensor:
        return self.objective.loss(prediction, batch.target, batch.timesteps).mean()

    def prompt_ids(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of the prompts, one tensor per tokenizer of the family, as its pipeline gives them: new tokens
        (Textual Inversion, pivotal tuning) spelt out for the tokenizers that hold them, as diffusers' loader spells
        them out there, and the prompt as a user writes it for the others (FLUX.1's T5 without its own rows read
        `<t> <t>_1` in training, `<t>` at generation); SD3's pipelines, without a loader, get it spelt out for all."""
        spelt = [self.prompt_transform(p) for p in prompts]
        holding = len(getattr(self, "embeddings", ()))  # the first encoders got the new tokens
        if not holding or not self.family.loads_textual_inversion:
            ids = self.family.tokenize(self.c.tokenizers, spelt)
        else:
            written = [self.user_prompt(p) for p in prompts]
            ids = [self.family.tokenize([tokenizer], spelt if i < holding else written)[0]
                   for i, tokenizer in enumerate(self.c.tokenizers)]
        return [to_device(t, self.accelerator.device) for t in ids]

    def condition(self, prompts: list[str], text_encoder=None) -> Conditioning:
        """Prompts -> the UNet's conditioning (`sketch2real.family`). `text_encoder` stands in for the first encoder
        (one being trained, or with Textual Inversion's rows), or is a (wrapped) `TextEncoders` holding them all.
        Once the frozen encoders are released, from the cache of their conditionings."""
        if text_encoder is None and self.frozen_conditions is not None:
            missing = list(dict.fromkeys(p for p in prompts if p not in self.frozen_conditions))
            if missing:  # a prompt not encoded before the release (sequential stages' categories)
                with self.resident_text_encoders(), torch.no_grad():
                    self.frozen_conditions.update({p: self._encode([p]) for p in missing})
            return Conditioning.cat([self.frozen_conditions[p] for p in prompts])
        return self._encode(prompts, text_encoder)

    def _encode(self, prompts: list[str], text_encoder=None) -> Conditioning:
        ids = self.prompt_ids(prompts)
        if text_encoder is not None and isinstance(self.accelerator.unwrap_model(text_encoder), TextEncoders):
            return Conditioning.from_tuple(text_encoder(ids))
        encoders = [text_encoder or self.c.text_encoder, *self.c.text_encoders[1:]]
        return self.family.encode(encoders, ids, self.opts.resolution)

    def release_text_encoders(self, prompts: list[str]) -> None:
        """Encode `prompts` (each alone) with the frozen text encoders, then free the encoders: T5-XXL alone is 4.7B
        parameters (9.5 GB in bf16) that training would otherwise hold for nothing. Conditionings then come from this
        cache; what needs the encoders again (validation images, a new prompt) loads them for that moment, as
        diffusers' SD3/FLUX scripts reload theirs for validation."""
        with torch.no_grad():
            cache = {p: self._encode([p]) for p in dict.fromkeys(prompts)}
        self.frozen_conditions = cache
        for name in self.family.text_encoders:
            setattr(self.c, name, None)
        free_device_memory()

    @contextmanager
    def resident_text_encoders(self):
        """The frozen text encoders on the device in the weight dtype for the block (loaded again if released)."""
        if self.frozen_conditions is None:
            yield
            return
        o = self.opts
        with zero3_init_disabled(self.accelerator):
            for name, encoder in zip(self.family.text_encoders, load_text_encoders(
                    self.family, o.pretrained_model_name_or_path, o.revision, o.variant, self.weight_dtype)):
                setattr(self.c, name, encoder.requires_grad_(False).to(self.accelerator.device, self.weight_dtype))
        try:
            yield
        finally:
            for name in self.family.text_encoders:
                setattr(self.c, name, None)
            free_device_memory()

    def samples_per_step(self) -> int:
        return sum(stream.sampler.global_batch for stream in self.streams.values()) * self.opts.gradient_accumulation_steps

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: one, at the options' learning rate and weight decay."""
        return [{"params": self.trainable_parameters()}]

    def predictor(self, model):
        """(noisy, timesteps, prompts) -> prediction with the current weights (held-out losses)."""
        denoiser, text_encoder = self.denoiser_of(model), self.text_encoder_of(model)

        def predict(noisy, timesteps, prompts):
            with self.accelerator.autocast():
                return self.family.predict(denoiser, noisy, timesteps, self.condition(prompts, text_encoder),
                                           guidance=self.opts.guidance_scale)

        return predict

    def pipeline(self, model):
        """A generation pipeline of the model's family with the current weights (validation images)."""
        scheduler = self.family.validation_scheduler(self.c.noise_scheduler)
        return assemble_pipeline(self.c, self.denoiser_of(model), self.text_encoder_of(model), scheduler)

    def validation_prompts(self) -> list[str]:
        return list(self.opts.validation_prompt)

    def card_prompt(self) -> str:
        """A prompt that uses what was trained, for the model card's "Use" section: the first validation prompt."""
        prompts = self.validation_prompts()
        return prompts[0] if prompts else "a sketch of a cat"

    def validate(self, accelerator, model, step: int) -> dict[str, float]:
        """Held-out metrics, then validation images (a mosaic, and their style scores); a preemption signal stops it
        between pieces, on every process together. Trainers differ in `heldout_metrics` and `validation_images`."""
        stop_if_preempted = lambda: preemption.check(accelerator)  # noqa: E731
        stop_if_preempted()
        model.eval()
        trained = getattr(accelerator.unwrap_model(model), "text_encoders", None)  # DreamBooth's, when they train
        encoders = list(trained.encoders.values()) if trained is not None else []
        with eager_mode(), zero3_embeddings_gathered(accelerator, encoders):
            logs = self.heldout_metrics(model) if self.heldout is not None else {}
            stop_if_preempted()
            if self.opts.num_validation_images:
                with accelerator.autocast(), decoding_in_vae_dtype(self.c.vae), self.resident_text_encoders():
                    rows, images, categories = self.validation_images(model, between=stop_if_preempted)
                if rows:
                    save_mosaic(accelerator, rows, self.opts.resolution, self.opts.output_dir, step)
                    logs.update(self.style_scores(images, categories))
        model.train()
        return logs

    def heldout_metrics(self, model) -> dict[str, float]:
        """The held-out denoising loss (fixed samples, noise and timesteps: comparable across steps and runs)."""
        from sketch2real.metrics import mean_ci95

        heldout = self.heldout
        if heldout.latents is None:
            heldout.latents, heldout.images = heldout_latents(self.c.vae, heldout.images, self.opts.seed), None
        losses = heldout_denoising_losses(self.predictor(model), self.objective.unweighted(), heldout.latents,
                                          heldout.prompts, self.opts.seed)
        return {"heldout_loss": float(losses.mean()), "heldout_loss_ci95": mean_ci95(losses, self.heldout.photos())}

    def validation_images(self, model, between=None) -> tuple[list[list], list, list[str | None]]:
        """(mosaic rows, the generated images, the category each asks for): `--num_validation_images` fixed-seed
        images per validation prompt."""
        o = self.opts
        if not self.validation_prompts():
            return [], [], []
        pipe = self.pipeline(model)
        prompts = [self.pipeline_prompt(pipe, p) for p in self.validation_prompts()]
        rows = generate_rows(pipe, prompts, o.num_validation_images, o.seed, o.resolution,
                             o.validation_inference_steps, self.family.pipeline_call_defaults(), between)
        categories = [c for c, row in zip(self.validation_categories(), rows) for _ in row]
        return rows, [image for row in rows for image in row], categories

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

    def write_on_main(self, model, write: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """Gather the trained fp32 weights (a collective under DeepSpeed), `write(state)` on the main process, and
        wait for it on every process: the pattern of every artifact."""
        state = trained_state_dict(self.accelerator, model)  # empty off the main process
        if self.accelerator.is_main_process:
            with zero3_init_disabled(self.accelerator):
                write(state)
        self.accelerator.wait_for_everyone()
