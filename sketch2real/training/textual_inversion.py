"""Textual Inversion: a new token (e.g. <sketch>) learns the Sketchy sketch style.

Only the new embedding rows are parameters: the base token embedding stays a frozen
module, and a small `new_rows` tensor is looked up for ids past the base vocabulary.
No whole-matrix gradient, no restoring of old rows, and the optimizer (also under
DDP and DeepSpeed) holds state for `num_vectors x hidden` numbers only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from sketch2real.cli import UserError, on_other_rank, option
from sketch2real.family import Family, TextEncoders, placeholder_tokens
from sketch2real.io import atomic_path
from sketch2real.models import SDComponents
from sketch2real.sketchy import category_words, with_article
from sketch2real.training.data import load_folder_images, load_shard_images
from sketch2real.training.diffusion import derive_seed
from sketch2real.training.options import TrainOptions, flags_not_taken
from sketch2real.training.prompts import check_validation_prompts, validation_rows
from sketch2real.training.task import DiffusionTask, HeldOut, no_heldout

logger = logging.getLogger("sketch2real")

STYLE_TEMPLATES = [  # {a_category}: the words with their article ("an airplane", "a cat")
    "{a_category} in the style of {token}",
    "a drawing of {a_category} in the style of {token}",
    "a rendering of {a_category} in the style of {token}",
    "a picture of {a_category} in the style of {token}",
    "a {token} of {a_category}",
    "a simple {category}, {token}",
]
OBJECT_TEMPLATES = [
    "a photo of a {token}",
    "a rendering of a {token}",
    "a close-up photo of a {token}",
    "a drawing of the {token}",
    "a good photo of a {token}",
]


@dataclass(kw_only=True, frozen=True)
class TextualInversionOptions(TrainOptions):
    """Textual Inversion: learn a placeholder token for the sketch style (or an object)."""

    FLAGS_NOT_TAKEN: ClassVar[dict[str, str]] = flags_not_taken(
        "--train_data_dir", only_save_embeds="not needed: learned_embeds.safetensors is always written, the whole "
                                             "pipeline only with --save_as_full_pipeline")

    placeholder_token: str = option("<sketch>", help="the new token")
    num_vectors: int = option(1, help="embedding vectors behind the token", min=1)
    initializer_token: str = option("sketch", help="word(s) whose embeddings (averaged) start the new vectors")
    learnable_property: str = option("style", help="style ('a {category} in the style of {token}') or object",
                                     choices=("style", "object"))
    categories: list[str] = option([], help="only these categories from the shards (default: all)")
    instance_image_type: str = option("sketch", help="sketch or photo", choices=("sketch", "photo"), noun="image type")
    train_data_dir: str = option("", help="a folder of training images instead of shards")
    num_instance_images: int = option(0, help="seeded choice of this many training images (0: all)", min=0)
    save_as_full_pipeline: bool = option(False, help="also save a full diffusers pipeline with the token added",
                                         affects="runtime")
    enable_t5_ti: bool = option(False, help="also learn the token's rows in T5 (SD3, FLUX.1: the file's 't5' tensor, as "
                                            "diffusers' advanced FLUX script); without it T5 reads the token's spelling")
    learning_rate: float | None = option(None, help="initial learning rate (after warmup); default 5e-4, 1.0 with "
                                                    "--optimizer prodigy", min_exclusive=0)
    adam_weight_decay: float = option(0.0, help="AdamW weight decay (0: keeps the embedding's norm)", min=0)

    def default_learning_rate(self, family: Family | None) -> float:
        return 5e-4

    def check(self) -> None:
        super().check()
        if not self.train_data_dir and not self.shard_dir:
            raise UserError("give --shard_dir or --train_data_dir")
        check_validation_prompts(self.validation_prompt, "--train_data_dir" if self.train_data_dir else "")
        shard_only = [flag for flag, given in (("--categories", self.categories),
                                               ("--instance_image_type", self.instance_image_type != "sketch")) if given]
        if self.train_data_dir and not self.shard_dir and shard_only and not on_other_rank():  # was silent
            logger.warning("%s: not used (they choose shard images; with --train_data_dir and --shard_dir, the "
                           "held-out ones)", " and ".join(shard_only))


class PlaceholderEmbedding(torch.nn.Module):
    """A frozen base embedding plus trainable rows for the ids appended after it."""

    def __init__(self, base: torch.nn.Embedding, initial_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.base_size = base.num_embeddings
        self.new_rows = torch.nn.Parameter(initial_rows.clone().float())

    @property
    def weight(self) -> torch.Tensor:  # what get_input_embeddings().weight readers expect
        return torch.cat([self.base.weight, self.new_rows.to(self.base.weight.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.base_size
        embedded = self.base(input_ids.clamp(max=self.base_size - 1))
        new = self.new_rows.to(embedded.dtype)[(input_ids - self.base_size).clamp(min=0)]
        return torch.where(is_new.unsqueeze(-1), new, embedded)


def initializer_ids(tokenizer, words: str) -> list[int]:
    """Token ids of the initializer words; each word must be one token of the vocabulary."""
    ids = []
    for word in words.split():
        pieces = tokenizer.tokenize(word)
        if len(pieces) != 1:
            raise UserError(f"initializer token {word!r} is not a single token of the vocabulary (it splits into "
                            f"{' '.join(pieces)}); pick a common word, or several words")
        ids.append(tokenizer.convert_tokens_to_ids(pieces[0]))
    if not ids:
        raise UserError("--initializer_token is empty")
    return ids


def add_placeholder_tokens(tokenizer, text_encoder, tokens: list[str], initializer: str, seed: int,
                           flag: str) -> PlaceholderEmbedding:
    """Append `tokens` to one tokenizer and give its encoder trainable fp32 rows for them (`PlaceholderEmbedding`),
    starting from the mean embedding of the `initializer` words, or with "" from random rows at the embedding's
    spread (seeded; diffusers' pivotal-tuning start). `flag`: the option that named the tokens, for messages."""
    vocab = tokenizer.get_vocab()
    if tokenizer.tokenize("A") == tokenizer.tokenize("a"):  # CLIP's: prompts are lowercased before added tokens match
        upper = [t for t in tokens if t != t.lower()]
        if upper:  # trained as written, then never found in a prompt: drawn with its first vector only, or none
            raise UserError(f"{flag} {upper[0]!r}: this text encoder's tokenizer lowercases prompts, so diffusers' "
                            f"loader never finds a token with capitals; give {upper[0].lower()!r}")
    clash = [t for t in tokens if t in vocab or tokenizer.tokenize(t) == [t + "</w>"]]
    if clash:
        raise UserError(f"token {clash[0]!r} is already in the vocabulary; choose another {flag}")
    init = initializer_ids(tokenizer, initializer) if initializer else None
    if text_encoder.get_input_embeddings().num_embeddings > len(tokenizer):  # T5: 32128 rows for 32100 tokens
        text_encoder.resize_token_embeddings(len(tokenizer))  # drop rows no id reaches, as diffusers' loader does
    tokenizer.add_tokens(tokens)
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    base = text_encoder.get_input_embeddings()
    if token_ids[0] != base.num_embeddings:
        raise UserError("the tokenizer and text encoder vocabularies differ in size; cannot append the new tokens")
    weight = base.weight.detach().float()
    if init is not None:
        start = weight[init].mean(0).expand(len(tokens), -1)
    else:
        generator = torch.Generator().manual_seed(derive_seed(seed, "new-token-rows", len(tokenizer)))
        start = torch.randn(len(tokens), weight.shape[1], generator=generator) * weight.std().cpu()
    text_encoder.requires_grad_(False)
    embedding = PlaceholderEmbedding(base, start.to(weight.device))
    text_encoder.set_input_embeddings(embedding)
    return embedding


def write_learned_embeds(family: Family, token: str, rows: list[torch.Tensor], path: Path) -> None:
    """Trained rows (the optimizer's fp32 master weights, in encoder order) in the family's Textual Inversion file
    format: SD 1.x/2.x, diffusers' {token: [num_vectors, hidden]}; SDXL, the community format {"clip_l": ...,
    "clip_g": ...} (the token goes in the file's metadata; `sketch2real.family.load_textual_inversion` and A1111/kohya
    read it)."""
    with atomic_path(path) as tmp:
        save_file(family.learned_embeds(token, rows), str(tmp), metadata={"token": token})


class TextualInversionTask(DiffusionTask):
    """Textual Inversion's part of the loop."""

    trainer = "textual_inversion"

    def refuse(self, family: Family) -> None:
        super().refuse(family)
        if self.opts.enable_t5_ti and not family.optional_embedding_key:
            raise UserError(f"--enable_t5_ti: a {family.name} model has no T5 encoder")

    def data_source(self) -> tuple[str, list[str]]:
        return self.opts.train_data_dir, list(self.opts.categories)

    def full_precision_components(self, family: Family) -> set[str]:
        # the new rows start from their CLIP encoders' fp32 embeddings; T5's (--enable_t5_ti) from its weight-dtype
        # ones, as pivotal tuning's: a T5-XXL loaded in fp32 is 18 GB per process, for a row
        return set(family.text_encoders[: family.embedding_encoders(optional=False)])

    def __init__(self, opts: TextualInversionOptions, accelerator, components: SDComponents | None = None):
        super().__init__(opts, accelerator, components)
        c, device = self.c, accelerator.device
        self.tokens = placeholder_tokens(opts.placeholder_token, opts.num_vectors)
        # The token goes into the family's embedding encoders (SDXL: both; SD3: both CLIPs; FLUX.1: CLIP-L; and T5 with
        # --enable_t5_ti), each with its own rows; otherwise a T5 reads the token's spelling, frozen.
        for encoder in c.text_encoders:  # T5 included: frozen, no gradient anywhere but in the new rows
            encoder.requires_grad_(False)
        encoders = list(zip(c.tokenizers, c.text_encoders))[: self.family.embedding_encoders(opts.enable_t5_ti)]
        self.embeddings = [add_placeholder_tokens(tokenizer, encoder, self.tokens, opts.initializer_token, opts.seed,
                                                  "--placeholder_token") for tokenizer, encoder in encoders]
        c.denoiser.requires_grad_(False).to(device, self.weight_dtype)
        for encoder in c.text_encoders:  # placed by `prepare` (ZeRO-3: a shard per rank, never the whole T5)
            encoder.to(self.weight_dtype)
            if opts.gradient_checkpointing:
                encoder.gradient_checkpointing_enable()
        for embedding in self.embeddings:  # the cast above took the trained rows along: they train in fp32
            embedding.new_rows.data = embedding.new_rows.data.float()
        if opts.gradient_checkpointing:
            c.denoiser.enable_gradient_checkpointing()
        # DDP/DeepSpeed see one module whose only parameters needing grad are the new rows
        self.model = TextEncoders(self.family, c.text_encoders, opts.resolution)

        geometry = None  # shard images: Sketchy's 256 px, the prompt's own (SDXL's time ids)
        if opts.train_data_dir:
            images, geometry = load_folder_images(opts.train_data_dir, opts.resolution, opts.num_instance_images)
            self.categories = [""] * len(images)
        else:
            images, metas = load_shard_images(opts.shard_dir, opts.split, opts.categories or None, opts.instance_image_type,
                                              opts.resolution, opts.num_instance_images, opts.seed, in_memory=False)
            self.categories = [m["category"] for m in metas]
        logger.info("%d training images", len(images))
        self.data = self.stream("data", images, geometry=geometry)
        self.heldout = self._heldout()

    def _heldout(self) -> HeldOut | None:
        opts = self.opts
        if not opts.num_heldout_samples or not opts.shard_dir:
            return None
        try:
            images, metas = load_shard_images(opts.shard_dir, opts.validation_split, opts.categories or None,
                                              opts.instance_image_type, opts.resolution, opts.num_heldout_samples, opts.seed)
        except UserError as err:
            return no_heldout(err, opts.validation_split)
        return HeldOut(images, [self.prompt_for(m["category"], i) for i, m in enumerate(metas)],
                       [m["category"] for m in metas], [m["key"] for m in metas])

    def prompt_for(self, category: str, choice: int) -> str:
        templates = STYLE_TEMPLATES if self.opts.learnable_property == "style" else OBJECT_TEMPLATES
        template = templates[choice % len(templates)]
        words = category_words(category) if category else "thing"
        return template.format(category=words, a_category=with_article(words), token=self.opts.placeholder_token)

    def prompt_transform(self, prompt: str) -> str:
        """Spell out a multi-vector token as diffusers' load_textual_inversion does: '<t>' -> '<t> <t>_1 ...'."""
        return prompt.replace(self.opts.placeholder_token, " ".join(self.tokens)) if len(self.tokens) > 1 else prompt

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [embedding.new_rows for embedding in self.embeddings]

    def loss(self, model, step: int, micro: int) -> torch.Tensor:
        batch = self.data.batch(step, micro)
        prompts = [self.prompt_for(self.categories[i], derive_seed(self.opts.seed, "template", step, i))
                   for i in batch.indices]
        return self.loss_of(batch, self.predict(self.c.denoiser, batch, self.condition(prompts, model)))

    def text_encoder_of(self, model):
        return self.accelerator.unwrap_model(model).encoders["text_encoder"]

    def _validation_categories(self) -> list[str]:
        return sorted(set(self.categories))[:2] or [""]

    def validation_rows(self) -> list[tuple[str, str | None]]:
        """(prompt, category) of each validation row: --validation_prompt's (one naming {category}: a row per category
        of the run, the first four, as DreamBooth's), else the first template's, for two categories."""
        if self.opts.validation_prompt:
            return validation_rows(self.opts.validation_prompt, self.categories)
        if self.opts.learnable_property == "object":  # the token is the object: one row (two were the same prompt),
            categories = sorted(set(self.categories) - {""})  # of the run's one category, if it has one
            return [(self.prompt_for("", 0), categories[0] if len(categories) == 1 else None)]
        return [(self.prompt_for(c, 0), c or None) for c in self._validation_categories()]

    def validation_prompts(self) -> list[str]:
        return [prompt for prompt, _ in self.validation_rows()]

    def validation_categories(self) -> list[str | None]:
        return [category for _, category in self.validation_rows()]

    def _write_embeds(self, state: dict[str, torch.Tensor], out: Path, name: str) -> None:
        write_learned_embeds(self.family, self.opts.placeholder_token, list(state.values()), out / name)

    def on_checkpoint(self, accelerator, model, step: int) -> None:
        self.write_on_main(model, lambda state: self._write_embeds(state, Path(self.opts.output_dir),
                                                                   f"learned_embeds-steps-{step}.safetensors"))

    def save_final(self, accelerator, model, out: Path) -> None:
        def write(state: dict[str, torch.Tensor]) -> None:
            self._write_embeds(state, out, "learned_embeds.safetensors")
            if self.opts.save_as_full_pipeline:
                self._save_pipeline(out)

        self.write_on_main(model, write)

    def _save_pipeline(self, out: Path) -> None:
        """Base pipeline with the token appended: every other weight and row is the base's, bit for bit."""
        from sketch2real.family import load_textual_inversion
        from sketch2real.models import load_base_pipeline, save_pretrained_atomic

        pipe = load_base_pipeline(self.family, self.opts.pretrained_model_name_or_path, self.opts.revision,
                                  self.opts.variant, self.opts.pretrained_vae_model_name_or_path)
        load_textual_inversion(pipe, str(out / "learned_embeds.safetensors"))
        save_pretrained_atomic(pipe, out)
