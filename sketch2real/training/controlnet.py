"""A ControlNet trained on Sketchy's pairs: the sketch conditions, its own photo is the target.

The ControlNet starts as a copy of the base denoiser's first blocks (`Family.new_controlnet`: SD/SDXL's
`ControlNetModel.from_unet`, SD3's and FLUX.1's `from_transformer`); the denoiser, text encoders and VAE stay frozen
in the weight dtype. The result is a plain diffusers ControlNet folder for the family's ControlNet pipeline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sketch2real.cli import UserError, option
from sketch2real.family import FAMILIES, Family, check_controlnet_class, controlnet_mismatch
from sketch2real.models import SDComponents, assemble_pipeline, load
from sketch2real.sketchy import photo_key, sketch_condition
from sketch2real.training.accelerator import cast_denoiser_inputs, configure_attention
from sketch2real.training.data import LazyImages
from sketch2real.training.diffusion import derive_seed, drops_prompt, vae_scale_factor
from sketch2real.training.options import TrainOptions
from sketch2real.training.prompts import (
    SamplePrompts,
    check_captions_file,
    check_prompt_template,
    check_validation_prompts,
    fill_category,
)
from sketch2real.training.task import DiffusionTask, HeldOut, no_heldout
from sketch2real.training.validation import heldout_denoising_losses, heldout_latents

logger = logging.getLogger("sketch2real")


@dataclass(kw_only=True, frozen=True)
class ControlNetOptions(TrainOptions):
    """Train a sketch -> photo ControlNet on Sketchy's paired shards."""

    controlnet_model_name_or_path: str = option("", help="start from this ControlNet instead of a copy of the UNet")
    prompt_template: str = option("a photo of a {category}", help="prompt of each pair ({category})")
    captions: str = option("", help="captions JSONL (infer/caption.py): use a sample's caption as its prompt")
    caption_prompt_id: str = option("", help="which prompt id's captions to use (default: the first per sample)")
    proportion_empty_prompts: float = option(0.0, help="fraction of prompts replaced by '' (helps guidance-free use)",
                                             min=0, max=1)
    categories: list[str] = option([], help="only these categories (default: all)")
    num_validation_sketches: int = option(4, help="held-out sketches in the validation mosaic (sketch | generated | photo; "
                                                  "0: no mosaic)", min=0, affects="runtime")
    validation_image: list[str] = option([], help="sketch files for the validation mosaic instead of held-out sketches "
                                         "(diffusers' flag): black strokes on white as Sketchy's, converted as training "
                                         "converts its sketches; each with a --validation_prompt (one for all, or one "
                                         "per image)", affects="runtime")
    learning_rate: float | None = option(None, help="initial learning rate (after warmup); default 1e-5, 1.0 with "
                                                    "--optimizer prodigy", min_exclusive=0)

    def default_learning_rate(self, family: Family | None) -> float:
        return 1e-5

    def check(self) -> None:
        super().check()
        if not self.shard_dir:
            raise UserError("--shard_dir is required: ControlNet trains on the sketch/photo pairs of the shards")
        check_captions_file(self.captions, self.caption_prompt_id)
        check_prompt_template(self.prompt_template, "--prompt_template")
        check_validation_prompts(self.validation_prompt, "--validation_image" if self.validation_image else "")
        missing = [file for file in self.validation_image if not Path(file).is_file()]
        if missing:
            raise UserError(f"--validation_image {missing[0]}: no such file")
        from sketch2real.shards import CorruptSample, open_image

        for file in self.validation_image:  # now, not at the first validation (a traceback, steps of training lost)
            try:
                open_image(file)
            except CorruptSample as err:
                raise UserError(f"--validation_image {file}: {err.reason}") from None
        counts = len(self.validation_image), len(self.validation_prompt)
        if self.validation_image and not (counts[1] and (1 in counts or counts[0] == counts[1])):
            raise UserError(f"--validation_image needs --validation_prompt: one for all images, or one per image "
                            f"(got {counts[0]} images and {counts[1]} prompts)")


def _pairs(shard_dir: str, split: str, categories, resolution: int) -> tuple[LazyImages, LazyImages, list]:
    from sketch2real.shards import ShardSamples

    # one reader for both views: a pair with either image corrupt is replaced whole, in both
    pairs = ShardSamples(shard_dir, split, fields=("sketch", "photo"), resolution=resolution, categories=categories)
    positions = list(range(len(pairs)))
    return LazyImages(pairs, "sketch", positions), LazyImages(pairs, "photo", positions), pairs.refs


def init_controlnet(denoiser, seed: int, vae_scale_factor: int = 8, family: Family = FAMILIES["sd"]):
    """The family's new ControlNet (a copy of the denoiser's first blocks, `Family.new_controlnet`), its new layers
    drawn from a seeded generator: the same run gives the same start on any number of processes and after a restart."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "controlnet-init"))
        return family.new_controlnet(denoiser, vae_scale_factor)


class ControlNetTask(DiffusionTask):
    """ControlNet's part of the loop."""

    trainer = "controlnet"

    def full_precision_components(self, family: Family) -> set[str]:
        return set() if self.opts.controlnet_model_name_or_path else {"denoiser"}  # a new ControlNet copies it

    def __init__(self, opts: ControlNetOptions, accelerator, components: SDComponents | None = None):
        import diffusers

        super().__init__(opts, accelerator, components)
        c, device = self.c, accelerator.device
        if opts.controlnet_model_name_or_path:
            check_controlnet_class(opts.controlnet_model_name_or_path, self.family, "--controlnet_model_name_or_path",
                                   opts.pretrained_model_name_or_path)
            controlnet = load(getattr(diffusers, self.family.controlnet_class), opts.controlnet_model_name_or_path,
                              "ControlNet")
            mismatch = controlnet_mismatch(controlnet, c.denoiser)
            if mismatch:  # before the latent cache and the first step, where it would end in a traceback
                raise UserError(f"--controlnet_model_name_or_path {opts.controlnet_model_name_or_path} is not a ControlNet "
                                f"of {opts.pretrained_model_name_or_path} ({mismatch})")
        else:  # from the denoiser's full-precision weights, before the frozen denoiser is cast to the weight dtype
            controlnet = init_controlnet(c.denoiser, opts.seed, vae_scale_factor(c.vae),
                                         self.family)
        c.denoiser.requires_grad_(False).to(device, self.weight_dtype)
        for encoder in c.text_encoders:
            encoder.requires_grad_(False).to(device, self.weight_dtype)
        controlnet.train()
        configure_attention(controlnet, opts, device)  # from_unet copies no attention processors: xformers here too
        cast_denoiser_inputs(controlnet)
        if self.family.controlnet_has_unused_parameters and getattr(accelerator, "ddp_handler", None) is not None:
            accelerator.ddp_handler.find_unused_parameters = True  # read when `prepare` wraps it in DDP
        if opts.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
            c.denoiser.enable_gradient_checkpointing()
        self.model = controlnet
        self.sketches, photos, refs = _pairs(opts.shard_dir, opts.split, opts.categories or None, opts.resolution)
        self.keys, self.categories = [r.key for r in refs], [r.category for r in refs]
        self.sample_prompts = SamplePrompts.load(opts.prompt_template, opts.captions, opts.caption_prompt_id)
        self.sample_prompts.check_covers(self.keys, "sketch/photo pairs")
        self.sample_prompts.warn_cut(self.family, c.tokenizers, self.keys)
        logger.info("%d sketch/photo pairs", len(self.keys))
        self.pairs = self.stream("pairs", photos)  # the photos are denoised; their sketches are read alongside
        self.heldout = self._heldout()
        if self.sample_prompts.per_category:  # one prompt per category (and ""): encoded once, then the encoders (T5-XXL) are freed
            prompts = sorted({self.prompt_for("", category) for category in set(self.categories)})
            self.release_text_encoders(prompts + [""] * bool(opts.proportion_empty_prompts)
                                       + (self.heldout.prompts if self.heldout is not None else []))

    def compiled_modules(self) -> list[torch.nn.Module]:
        return [self.c.denoiser, self.model]

    def card_prompt(self) -> str:
        """Generation conditions each image on a test sketch: the template, filled per sketch's category."""
        return self.opts.prompt_template

    def prompt_for(self, key: str, category: str, step: int = -1) -> str:
        o = self.opts
        if step >= 0 and drops_prompt(o.proportion_empty_prompts, o.seed, "empty", step, key):
            return ""
        return self.sample_prompts(key, category)

    def _heldout(self) -> HeldOut | None:
        o = self.opts
        try:
            sketches, photos, refs = _pairs(o.shard_dir, o.validation_split, o.categories or None, o.resolution)
        except UserError as err:
            return no_heldout(err, o.validation_split)
        n = min(len(refs), max(o.num_heldout_samples, o.num_validation_sketches))
        if n == 0:
            return None
        # spread over the split (sorted by category), so that every category has pairs to derange
        chosen = sorted({round(i * (len(refs) - 1) / max(1, n - 1)) for i in range(n)})
        return HeldOut(photos[chosen], [self.prompt_for(refs[i].key, refs[i].category) for i in chosen],
                       [refs[i].category for i in chosen], [photo_key(refs[i].key) for i in chosen], sketches[chosen])

    def _conditioning(self, sketches: torch.Tensor, controlnet) -> torch.Tensor:
        """The ControlNet's input for sketches in [-1, 1] (`Family.control_input`: pixels, or VAE latents)."""
        return self.family.control_input(self.c.vae, sketch_condition(sketches).to(self.accelerator.device), controlnet)

    def loss(self, model, step: int, micro: int) -> torch.Tensor:
        batch = self.pairs.batch(step, micro)
        prompts = [self.prompt_for(self.keys[i], self.categories[i], step) for i in batch.indices]
        with torch.no_grad():
            text = self.condition(prompts)
        sketches = self._conditioning(self.pairs.rows(step, micro, self.sketches), model)
        prediction = self.predict(self.c.denoiser, batch, text, controlnet=model, control_image=sketches)
        return self.loss_of(batch, prediction)

    def heldout_losses(self, accelerator, controlnet, sketches: torch.Tensor, latents: torch.Tensor,
                       prompts: list[str]) -> np.ndarray:
        """Each held-out photo's denoising loss (from its `heldout_latents`) with `sketches` as the ControlNet's
        conditioning."""
        conditioning = self._conditioning(sketches, controlnet)
        position = {"start": 0}

        def predict(noisy, timesteps, batch_prompts):
            start = position["start"]
            position["start"] += len(batch_prompts)
            with accelerator.autocast():
                return self.family.predict(self.c.denoiser, noisy, timesteps, self.condition(batch_prompts), controlnet,
                                           conditioning[start : start + len(batch_prompts)])

        return heldout_denoising_losses(predict, self.objective.unweighted(), latents, prompts, self.opts.seed)

    def heldout_metrics(self, model) -> dict:
        """Held-out loss, and the conditioning gain: each held-out photo's loss with a sketch of another photo of its
        category minus with its own sketch, with a 95% interval. Above 0 once the ControlNet follows its sketch
        (ControlNets start ignoring it and pick it up suddenly, Zhang et al. 2023: this says when)."""
        from sketch2real.metrics import mean_ci95, partners_within

        o, h, logs = self.opts, self.heldout, {}
        if not o.num_heldout_samples:
            return logs
        controlnet, count = self.accelerator.unwrap_model(model), min(o.num_heldout_samples, len(h))
        if h.latents is None:  # the photos encoded once, for every validation (the photos stay: the mosaics show them)
            h.latents = heldout_latents(self.c.vae, h.images[:count], o.seed)
        sketches, latents, prompts = h.conditions[:count], h.latents, h.prompts[:count]
        own = self.heldout_losses(self.accelerator, controlnet, sketches, latents, prompts)
        logs["heldout_loss"], logs["heldout_loss_ci95"] = float(own.mean()), mean_ci95(own, h.keys[:count])  # by photo
        other, kept = partners_within(h.categories[:count], np.random.default_rng(o.seed), h.keys[:count])
        if kept.any():
            deranged = self.heldout_losses(self.accelerator, controlnet, sketches[other], latents, prompts)
            gains = (deranged - own)[kept]
            logs["conditioning_gain"] = float(gains.mean())
            logs["conditioning_gain_ci95"] = mean_ci95(gains, np.asarray(h.keys[:count])[kept])
        elif not getattr(self, "_no_gain_said", False) and self.accelerator.is_main_process:  # once, not per validation
            self._no_gain_said = True
            logger.warning("no conditioning gain: none of the %d held-out sketches has one of another photo of its "
                           "category to swap in (more --num_heldout_samples, or a --validation_split with several "
                           "photos per category)", count)
        return logs

    def validation_images(self, model, between=None):
        """Rows (held-out sketch | `--num_validation_images` generated from it | its photo) for
        `--num_validation_sketches` held-out pairs, prompted with their own prompts or, as diffusers' script, with
        `--validation_prompt` (several: one per sketch in turn); with `--validation_image`, rows (sketch | images) of
        those files, paired with the prompts as diffusers' script pairs them."""
        from torchvision.transforms.functional import to_pil_image

        from sketch2real.shards import open_image

        o, h = self.opts, self.heldout
        if o.validation_image:  # the user's sketches: no photo to show beside them, no category to check
            count = max(len(o.validation_image), len(o.validation_prompt))
            sketches = [open_image(o.validation_image[i % len(o.validation_image)], o.resolution) for i in range(count)]
        else:
            count = min(o.num_validation_sketches, len(h)) if h is not None else 0
            sketches = [to_pil_image((h.conditions[i] + 1) / 2) for i in range(count)]
        if not count:
            return [], [], []
        scheduler = self.family.validation_scheduler(self.c.noise_scheduler)
        pipe = assemble_pipeline(self.c, self.c.denoiser, self.c.text_encoder, scheduler, self.accelerator.unwrap_model(model))
        pipe.set_progress_bar_config(disable=True)
        prompts = self.validation_row_prompts(count)
        rows, generated, n = [], [], o.num_validation_images
        for i, sketch in enumerate(sketches):
            # image 0 of each sketch keeps the seed it had when there was one image per sketch
            generators = [torch.Generator().manual_seed(derive_seed(o.seed, "validation", i, *([j] if j else [])))
                          for j in range(n)]
            images = pipe([prompts[i]] * n, height=o.resolution, width=o.resolution, generator=generators,
                          num_inference_steps=o.validation_inference_steps,
                          **{self.family.control_image_argument: [sketch_condition(sketch)] * n},
                          **self.family.pipeline_call_defaults()).images
            rows.append([sketch, *images] + ([] if o.validation_image else [to_pil_image((h.images[i] + 1) / 2)]))
            generated += images
            if between is not None:
                between()
        categories = [None] * count if o.validation_image else h.categories[:count]
        return rows, generated, [c for c in categories for _ in range(n)]

    def validation_row_prompts(self, count: int) -> list[str]:
        """The prompt of each of the first `count` validation rows: --validation_prompt's in turn, `{category}` filled
        in with the row's held-out sketch's category (a --validation_image has none: refused), else the sketch's own."""
        o, h = self.opts, self.heldout
        if not o.validation_prompt:
            return h.prompts[:count]
        prompts = [o.validation_prompt[i % len(o.validation_prompt)] for i in range(count)]
        categories = [""] * count if o.validation_image else h.categories  # (refused with a --validation_image)
        return [fill_category(p, c) for p, c in zip(prompts, categories)]

    def save_final(self, accelerator, model, out: Path) -> None:
        """A diffusers ControlNet folder in `out` (config.json + diffusion_pytorch_model.safetensors)."""
        from sketch2real.models import save_pretrained_atomic

        def write(state: dict[str, torch.Tensor]) -> None:  # the fp32 master weights
            trained = accelerator.unwrap_model(model)
            controlnet = type(trained).from_config(trained.config)
            # the trained weights are the parameters; buffers (SD3's fixed sin-cos position table) come with the config
            missing = set(controlnet.load_state_dict(state, strict=False).missing_keys)
            if missing - {name for name, _ in controlnet.named_buffers()}:
                raise RuntimeError(f"trained ControlNet weights lack {sorted(missing)[:3]}")
            save_pretrained_atomic(controlnet, out)

        self.write_on_main(model, write)
