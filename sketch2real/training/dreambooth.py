"""DreamBooth on the shared loop: instance images from shards or a folder, prior preservation,
optional text-encoder training (also under DeepSpeed), LoRA adapters."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from sketch2real.cli import UserError, default_of, on_other_rank, option
from sketch2real.family import (
    CONDITIONING_VERSION,
    FAMILIES,
    Conditioning,
    Family,
    TextEncoders,
    check_lora_family,
    embedding_file,
    family_of,
    pipeline_class,
    placeholder_tokens,
)
from sketch2real.io import atomic_path, differences, sort_safetensors_metadata, umask_modes, write_json
from sketch2real.models import (
    SDComponents,
    check_peft_for_text_encoder_adapters,
    dtype_for,
    load_base_pipeline,
    local_model_identity,
    model_identity,
    save_pretrained_atomic,
)
from sketch2real.training.accelerator import main_process_view, zero3_init_disabled
from sketch2real.training.data import load_folder_images, load_shard_images
from sketch2real.training.diffusion import derive_seed, drops_prompt
from sketch2real.training.options import TrainOptions, flags_not_taken
from sketch2real.training.preemption import preemption
from sketch2real.training.prompts import (
    SamplePrompts,
    as_word,
    check_captions_file,
    check_prompt_template,
    check_validation_prompts,
    validation_rows,
)
from sketch2real.training.task import DiffusionTask, HeldOut, no_heldout
from sketch2real.training.text_store import TextStore
from sketch2real.training.textual_inversion import add_placeholder_tokens, write_learned_embeds

logger = logging.getLogger("sketch2real")
PIVOTAL_TOKEN = "<s0>"  # the new tokens of pivotal tuning, as diffusers' advanced scripts name them: <s0>, <s0>_1, ...
# what only prior preservation reads: given without --with_prior_preservation, a one-line warning
CLASS_OPTIONS = ("class_prompt", "class_data_dir", "num_class_images", "prior_loss_weight", "sample_batch_size",
                 "class_inference_steps")


@dataclass(kw_only=True, frozen=True)
class DreamBoothOptions(TrainOptions):
    """DreamBooth: bind a rare token to a few instance images (here: Sketchy sketches of one category)."""

    FLAGS_NOT_TAKEN: ClassVar[dict[str, str]] = flags_not_taken(
        "--instance_data_dir", "validation_epochs",
        lora_blocks="give --lora_layers with the blocks' module names (e.g. transformer_blocks.12.attn.to_q)",
        pre_compute_text_embeddings="not needed: with the text encoders frozen, prompts are encoded once and the "
                                    "encoders freed",
        prior_generation_precision="class images are generated in --mixed_precision's dtype",
        output_kohya_format="give --lora_format comfyui (kohya's key names; SD 1.x, SDXL)",
        lora_dropout="not taken: LoRA adapters train without dropout (diffusers' default, 0)",
        train_text_encoder_frac="not taken: with --train_text_encoder the encoders (or their adapters) train every step")

    instance_category: str = option("", help="Sketchy category whose images are the instance set (from --shard_dir)")
    instance_image_type: str = option("sketch", help="sketch or photo: which image of each pair to learn",
                                      choices=("sketch", "photo"), noun="image type")
    instance_data_dir: str = option("", help="a folder of instance images instead of shards")
    num_instance_images: int = option(0, help="this many instance images (0: all): a seeded choice of the shards', "
                                      "a folder's first by name", min=0)
    instance_prompt: str = option("a sks sketch", help="prompt for instance images, e.g. 'a sks sketch of a cat'; "
                                  "{category}: each image's category ('a sks sketch of a {category}': a style over many "
                                  "categories that keeps them apart)")
    captions: str = option("", help="captions JSONL (infer/caption.py): an instance image's caption is its prompt "
                                    "(images without one keep --instance_prompt)")
    caption_prompt_id: str = option("", help="which prompt id's captions to use (default: the first per sample)")
    with_prior_preservation: bool = option(False, help="add the prior-preservation loss on generated class images")
    class_prompt: str = option("", help="prompt of the class images, e.g. 'a sketch of a cat'")
    class_data_dir: str = option("", help="folder of class images; missing ones are generated and kept for the next run",
                                 affects="runtime")
    num_class_images: int = option(100, help="class images used (generated if fewer exist)", min=1)
    prior_loss_weight: float = option(1.0, help="weight of the prior-preservation loss", min=0)
    sample_batch_size: int = option(4, help="batch size per device when generating class images", min=1, affects="runtime")
    class_inference_steps: int = option(25, help="denoising steps for generated class images", min=1)
    train_text_encoder: bool = option(False, help="also train the text encoder(s): whole, or with --lora_rank LoRA adapters "
                                                  "on their attention, as diffusers' LoRA scripts (the CLIP encoders: SDXL "
                                                  "and SD3 both, FLUX.1 its CLIP); under DeepSpeed too")
    lora_rank: int = option(0, help="train LoRA adapters of this rank instead of full weights (0: full fine-tuning; "
                                    "--rank: diffusers' LoRA scripts' name)", min=0, aliases=("rank",))
    lora_alpha: float = option(0, help="LoRA alpha (0: same as rank; fractional as kohya's, e.g. 0.5); saved in the "
                                       "file's adapter metadata, so plain diffusers' load_lora_weights reloads the "
                                       "same strength", min=0)
    learning_rate: float | None = option(None, help="initial learning rate (after warmup); default: diffusers' DreamBooth "
                                                    "scripts' for the model's family: full weights 5e-6 (SD 1.x/2.x, "
                                                    "SDXL) or 1e-4 (SD3, FLUX); with --lora_rank 5e-4 (SD 1.x/2.x) or "
                                                    "1e-4 (SDXL, SD3, FLUX); 1.0 with --optimizer prodigy",
                                         min_exclusive=0)
    adam_weight_decay: float | None = option(None, help="AdamW weight decay; default: diffusers' DreamBooth scripts' for "
                                                        "the model's family: 1e-2 (SD 1.x/2.x; SDXL full weights), 1e-4 "
                                                        "(SDXL LoRA, SD3, FLUX)", min=0)
    use_dora: bool = option(False, help="DoRA: LoRA adapters that also learn each weight's magnitude (peft; saved with "
                                        "the adapter settings, diffusers' load_lora_weights reloads it as DoRA)")
    lora_type: str = option("lora", help="kind of adapter with --lora_rank: lora, or lokr (LoKr: Kronecker-product "
                                         "updates, peft's; written as pytorch_lokr_weights.safetensors in LyCORIS' names, "
                                         "which ComfyUI reads (A1111 and kohya's scripts too for SD 1.x/SDXL) and "
                                         "generation merges; SD 1.x, SDXL, SD3, FLUX.1)",
                            choices=("lora", "lokr"), noun="adapter type")
    lora_format: str = option("diffusers", help="LoRA file format: diffusers (pytorch_lora_weights.safetensors); comfyui: "
                                                "also pytorch_lora_weights_comfyui.safetensors in kohya's key format, for "
                                                "A1111, ComfyUI and kohya's scripts (SD 1.x, SDXL)",
                              choices=("diffusers", "comfyui"), noun="LoRA format", affects="runtime")
    validation_epochs: int = option(0, help="validate every N passes over the instance images instead of every "
                                            "--validation_steps (diffusers' LoRA scripts' flag): N x ceil(instance images "
                                            "/ (batch x processes x accumulation)) steps", min=0, affects="runtime")
    lora_layers: str = option("", help="with --lora_rank: the denoiser's modules to adapt, comma-separated names or name "
                                       "endings as peft matches them, e.g. 'attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,"
                                       "ff.net.2' (diffusers' SD3/FLUX scripts' flag; default: the family's, the attention "
                                       "projections); saved in the file's settings, which diffusers' loader reads")
    train_text_encoder_ti: bool = option(False, help="pivotal tuning (diffusers' advanced scripts): new tokens learn their "
                                         "embeddings in every embedding encoder together with the LoRA; --token_abstraction "
                                         "in the prompts stands for them; saved as learned_embeds.safetensors (token <s0>) "
                                         "beside the LoRA, and generation loads both")
    token_abstraction: str = option("TOK", help="with --train_text_encoder_ti: the word in --instance_prompt (and "
                                                "--validation_prompt) that the new tokens replace")
    num_new_tokens_per_abstraction: int = option(2, help="with --train_text_encoder_ti: new tokens (embedding vectors) "
                                                         "behind the abstraction", min=1)
    initializer_concept: str = option("", help="with --train_text_encoder_ti: word(s) whose embeddings (averaged) start "
                                               "the new tokens (default: random, at the embedding's spread)")
    text_encoder_lr: float | None = option(None, help="with --train_text_encoder: the text encoders' (or their adapters') "
                                           "learning rate (not scaled by --scale_lr); default: diffusers' script's for "
                                           "the family (adapters: SDXL, SD3, FLUX.1 5e-6; whole: SD3, FLUX.1 5e-6; "
                                           "else --learning_rate); --learning_rate under Prodigy. With "
                                           "--train_text_encoder_ti: the new tokens' rows' (default --learning_rate; "
                                           "diffusers' advanced scripts 5e-6)", min_exclusive=0)
    adam_weight_decay_text_encoder: float | None = option(None, help="with --train_text_encoder(_ti): their weight decay; "
                                                          "default: diffusers' (1e-3 where their learning rate is "
                                                          "5e-6; else --adam_weight_decay)", min=0)
    initial_lora: str = option("", help="start the LoRA adapters from this LoRA folder (a run's output with "
                                        "pytorch_lora_weights.safetensors) instead of a fresh start; with --lora_rank")
    caption_dropout_probability: float = option(0.0, help="probability that an instance image is trained with the empty "
                                                "prompt instead of --instance_prompt (seeded per step and image; the "
                                                "style then also arrives without its trigger)", min=0, max=1)

    def default_learning_rate(self, family: Family | None) -> float:
        return self._default_optimizer(family)[0]

    def default_weight_decay(self, family: Family | None) -> float:
        return self._default_optimizer(family)[1]

    def _default_optimizer(self, family: Family | None) -> tuple[float, float]:
        family = family or FAMILIES["sd"]  # a model that cannot be read: the task refuses it before training
        return family.dreambooth_lora_optimizer if self.lora_rank else family.dreambooth_optimizer

    def check(self) -> None:
        super().check()
        if not self.instance_data_dir and not self.shard_dir:
            raise UserError("give --shard_dir (with --instance_category) or --instance_data_dir")
        check_prompt_template(self.instance_prompt, "--instance_prompt")
        check_validation_prompts(self.validation_prompt)
        check_captions_file(self.captions, self.caption_prompt_id)
        if self.instance_data_dir and ("{category}" in " ".join([self.instance_prompt, *self.validation_prompt])
                                       or self.captions):
            raise UserError("{category} and --captions need the shards' categories and keys: give --shard_dir, "
                            "not --instance_data_dir")
        shard_only = [flag for flag, given in (("--instance_category", self.instance_category),
                                               ("--instance_image_type", self.instance_image_type != "sketch")) if given]
        if self.instance_data_dir and not self.shard_dir and shard_only and not on_other_rank():  # was silent
            logger.warning("%s: not used (they choose shard images; with --instance_data_dir and --shard_dir, the "
                           "held-out ones)", " and ".join(shard_only))
        if self.train_text_encoder and self.train_text_encoder_ti:
            raise UserError("--train_text_encoder_ti trains new tokens' rows, --train_text_encoder the encoders' "
                            "adapters: choose one (as diffusers' advanced scripts)")
        if self.text_encoder_lr is not None and self.optimizer == "prodigy" and not on_other_rank():  # was silent
            logger.warning("--text_encoder_lr is not used: Prodigy estimates one step size for every group (the text "
                           "encoders' too, scaled by --learning_rate)")
        if (self.text_encoder_lr, self.adam_weight_decay_text_encoder) != (None, None) and not (
                self.train_text_encoder or self.train_text_encoder_ti):
            raise UserError("--text_encoder_lr and --adam_weight_decay_text_encoder are for the text encoders (or their "
                            "LoRA adapters, or pivotal tuning's new token rows): give --train_text_encoder or "
                            "--train_text_encoder_ti")
        if self.train_text_encoder and self.lora_type == "lokr":
            raise UserError("--lora_type lokr adapts the denoiser only: --train_text_encoder needs --lora_type lora")
        if self.lora_format != "diffusers" and not self.lora_rank:
            raise UserError(f"--lora_format {self.lora_format} is the format of LoRA files: give --lora_rank")
        if self.lora_layers and not self.lora_rank:
            raise UserError("--lora_layers are the modules LoRA adapts: give --lora_rank")
        if self.use_dora and not self.lora_rank:
            raise UserError("--use_dora is a kind of LoRA adapter: give --lora_rank")
        if self.lora_alpha and not self.lora_rank:
            raise UserError("--lora_alpha scales LoRA adapters: give --lora_rank")
        if self.use_dora and self.lora_format == "comfyui":
            raise UserError("--lora_format comfyui writes plain LoRA keys: a DoRA's magnitudes have no place there")
        if self.lora_type == "lokr" and (self.use_dora or self.initial_lora or self.lora_format != "diffusers"):
            raise UserError("--lora_type lokr: not with --use_dora, --initial_lora or --lora_format comfyui (its one file "
                            "is already in the format ComfyUI reads)")
        if self.train_text_encoder_ti and not (self.lora_rank and self.lora_type == "lora"):
            raise UserError("--train_text_encoder_ti trains new tokens together with LoRA adapters: give --lora_rank")
        if self.train_text_encoder_ti and not as_word(self.token_abstraction).search(self.instance_prompt):
            raise UserError(f"--train_text_encoder_ti: --instance_prompt {self.instance_prompt!r} does not contain "
                            f"--token_abstraction {self.token_abstraction!r}, which the new tokens stand for")
        if self.lora_type == "lokr" and not self.lora_rank:
            raise UserError("--lora_type lokr sets the kind of adapter: give --lora_rank")
        if self.lora_rank and (Path(self.output_dir) / "model_index.json").is_file():  # left by a full fine-tune
            raise UserError(f"{self.output_dir} holds a full pipeline (model_index.json): generation would load it, not "
                            "the LoRA saved beside it; use another --output_dir, or remove it")
        if self.initial_lora and not self.lora_rank:
            raise UserError("--initial_lora continues LoRA adapters: give --lora_rank (the rank it was trained with)")
        if self.initial_lora and not (Path(self.initial_lora) / "pytorch_lora_weights.safetensors").is_file():
            raise UserError(f"--initial_lora {self.initial_lora}: no pytorch_lora_weights.safetensors there")
        if self.initial_lora:
            try:
                family = family_of(self.pretrained_model_name_or_path, self.revision)
            except UserError:  # a base that cannot be read: the task says so
                family = None
            if family is not None:
                check_lora_family(self.initial_lora, family, "--initial_lora", self.pretrained_model_name_or_path)
        if self.with_prior_preservation and not (self.class_prompt and self.class_data_dir):
            raise UserError("--with_prior_preservation needs --class_prompt and --class_data_dir")
        unused = [f"--{f.name}" for f in dataclasses.fields(self)
                  if f.name in CLASS_OPTIONS and getattr(self, f.name) != default_of(f)]
        if unused and not self.with_prior_preservation and not on_other_rank():  # diffusers' scripts warn here too
            logger.warning("%s: not used without --with_prior_preservation", ", ".join(unused))


class DreamBoothModel(torch.nn.Module):
    """The one module handed to accelerate/DeepSpeed: the denoiser and, if trained, the text encoders.

    Wrapping them in one module is what lets DeepSpeed train the text encoders too
    (accelerate gives DeepSpeed a single model; see huggingface/diffusers#1815).
    """

    def __init__(self, family: Family, denoiser, text_encoders: TextEncoders | None = None, guidance: float | None = None):
        super().__init__()
        self.family, self.guidance = family, guidance
        self.denoiser = denoiser
        self.text_encoders = text_encoders

    def forward(self, noisy_latents, timesteps, input_ids: list[torch.Tensor] | None = None,
                conditioning: Conditioning | None = None, geometry: torch.Tensor | None = None):
        if self.text_encoders is not None:
            conditioning = Conditioning.from_tuple(self.text_encoders(input_ids))
        return self.family.predict(self.denoiser, noisy_latents, timesteps, conditioning, guidance=self.guidance,
                                   geometry=geometry)


def missing_class_images(folder: Path, count: int) -> list[int]:
    """Indices i of `class-{i:05d}.png` to generate so that `folder` holds `count` class images."""
    from sketch2real.shards import image_files

    try:
        existing = {p.name for p in image_files(folder)}  # as training reads them (a Mac's `._*` twins aside)
    except UserError:  # no folder or no image yet
        existing = set()
    missing, i = [], 0
    while len(missing) < count - len(existing):
        if f"class-{i:05d}.png" not in existing:
            missing.append(i)
        i += 1
    return missing


# The LoraConfig fields a LoRA file's metadata always holds (diffusers' loader builds `LoraConfig(**metadata)` from
# them); the others only where they differ from peft's defaults: the whole config named fields an older peft refuses
# (peft 0.21's kasa_config: a TypeError on load with 0.19/0.20). Not how it was made (a local path, a revision).
LORA_METADATA_FIELDS = ("r", "lora_alpha", "target_modules", "use_dora", "lora_dropout", "bias", "init_lora_weights",
                        "rank_pattern", "alpha_pattern")
LORA_METADATA_LOCAL = ("base_model_name_or_path", "revision", "inference_mode")


def lora_file_metadata(config) -> dict:
    """An adapter's `LoraConfig` as its LoRA file's metadata (`LORA_METADATA_FIELDS`, and what differs from peft's
    defaults), a set as a sorted list (a set's order varies between runs)."""
    from peft import LoraConfig

    defaults = LoraConfig().to_dict()
    kept = {k: v for k, v in config.to_dict().items()
            if k in LORA_METADATA_FIELDS or (k not in LORA_METADATA_LOCAL and v != defaults.get(k))}
    return {k: sorted(v) if isinstance(v, set) else v for k, v in kept.items()}


def text_store_identity(opts: DreamBoothOptions, family: Family, dtype: torch.dtype) -> str:
    """What a text store's conditionings depend on: the text encoders by what the model's files hold (its path as
    typed was another model run from another folder, or one trained again in place, and a shared
    --latent_cache_dir served its encodings), the family, dtype, resolution where the conditioning holds it (SDXL's
    time ids: FLUX.1's store of a captions run is hundreds of GiB) and prompt length."""
    identity = "|".join(map(str, (model_identity(opts.pretrained_model_name_or_path), opts.revision, opts.variant,
                                  family.name, dtype, family.conditioning_resolution(opts.resolution),
                                  f"conditioning-{CONDITIONING_VERSION}")))
    if family.max_sequence_length != FAMILIES[family.name].max_sequence_length:  # T5/Qwen's, given
        identity += f"|tokens={family.max_sequence_length}"
    return identity


CLASS_CONFIG = "class_config.json"  # the settings a --class_data_dir's images were generated with


def class_image_settings(opts: DreamBoothOptions) -> dict:
    """What a class folder's images depend on (recorded in its `class_config.json` when they are generated): the
    prompt, size, steps, seed, and the model (and revision) and VAE that draw them (a local folder by its absolute
    path, and by what its files hold: a sequential stage's model trained again in place drew other images)."""
    model, vae = opts.pretrained_model_name_or_path, opts.pretrained_vae_model_name_or_path or None
    return {**{k: getattr(opts, k) for k in ("class_prompt", "resolution", "class_inference_steps", "seed", "revision")},
            "model": str(Path(model).resolve()) if Path(model).is_dir() else model,
            "vae": str(Path(vae).resolve()) if vae and Path(vae).is_dir() else vae,
            "model_weights": local_model_identity(model), "vae_weights": local_model_identity(vae or "")}


def class_images_problem(folder: Path, settings: dict) -> str:
    """Why a class folder's images are not this run's (another prompt, size, sampler steps, seed or model: reused on
    their count alone before, e.g. a cat run's beside a dog run's), or "". A folder from before its settings were
    recorded, or of images put there by hand, is taken as it is; so is a setting its record predates."""
    config = folder / CLASS_CONFIG
    saved = json.loads(config.read_text()) if config.is_file() else {}
    now = {k: v for k, v in settings.items() if k in saved}
    return differences(now, saved) if saved and now != saved else ""


def ensure_class_images(accelerator, opts: DreamBoothOptions) -> None:
    """Generate the missing class images, split across ranks, with per-image seeds (world-size independent).

    Rank 0 lists the folder once, after every rank has arrived, and shares the list: ranks
    that listed it at their own time could see different files and split the work differently.
    """
    from tqdm.auto import tqdm

    folder = Path(opts.class_data_dir)
    accelerator.wait_for_everyone()
    family = family_of(opts.pretrained_model_name_or_path, opts.revision).with_max_sequence_length(
        opts.max_sequence_length).with_own_images(bool(opts.instance_data_dir))
    # drawn with the conditioning the class rows train with (SDXL: the 256 px sources' size, not the pipeline's own
    # height x width, where the instances are Sketchy's; SD3: as many T5 tokens): else the prior loss taught "a 256 px
    # source looks like a sharp R px one"
    conditioning = json.loads(json.dumps(family.generation_kwargs()))
    settings = {**class_image_settings(opts), "conditioning": conditioning}

    def look() -> list[int]:
        problem = class_images_problem(folder, settings)
        if problem:
            raise UserError(f"--class_data_dir {folder} holds class images made with other settings ({problem}): give "
                            "another folder (or the same settings)")
        return missing_class_images(folder, opts.num_class_images)

    missing = main_process_view(accelerator, look)
    if not missing:
        return
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if len(missing) == opts.num_class_images and not (folder / CLASS_CONFIG).is_file():  # an empty folder: ours
            write_json(folder / CLASS_CONFIG, settings)
        logger.info("generating %d class images in %s", len(missing), folder)
    mine = missing[accelerator.process_index :: accelerator.num_processes]
    with zero3_init_disabled(accelerator):
        pipe = load_base_pipeline(family, opts.pretrained_model_name_or_path, opts.revision, opts.variant,
                                  opts.pretrained_vae_model_name_or_path, dtype_for(accelerator.mixed_precision))
    pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(missing), desc="class images", disable=not accelerator.is_local_main_process)
    accelerator.wait_for_everyone()  # the folder exists before any rank writes into it
    for start in range(0, len(mine), opts.sample_batch_size):
        preemption.check()  # the images written so far are kept: a requeued job generates only the rest
        batch = mine[start : start + opts.sample_batch_size]
        generators = [torch.Generator().manual_seed(derive_seed(opts.seed, "class", opts.class_prompt, j)) for j in batch]
        images = pipe(prompt=[opts.class_prompt] * len(batch), height=opts.resolution, width=opts.resolution,
                      num_inference_steps=opts.class_inference_steps, generator=generators,
                      **family.generation_kwargs()).images
        for j, image in zip(batch, images):
            with atomic_path(folder / f"class-{j:05d}.png") as tmp:
                image.save(tmp, format="PNG")
        bar.update(len(batch) * accelerator.num_processes)
    bar.close()
    del pipe
    accelerator.wait_for_everyone()


class DreamBoothTask(DiffusionTask):
    """DreamBooth's part of the loop: its model, its batches and loss, its outputs."""

    trainer = "dreambooth"

    def data_source(self) -> tuple[str, list[str]]:
        o = self.opts
        return o.instance_data_dir, [o.instance_category] if o.instance_category else []

    def refuse(self, family: Family) -> None:
        super().refuse(family)
        if "{category}" in self.opts.class_prompt:  # it was the class images' literal prompt, braces and all
            raise UserError(f"--class_prompt {self.opts.class_prompt!r}: prior preservation has one class set, so no "
                            "{category} (sequential DreamBooth fills it in per stage); name the class")
        if self.opts.lora_type == "lokr" and family.lokr_prefix is None:
            raise UserError(f"--lora_type lokr is built for SD 1.x, SDXL, SD3 and FLUX.1, not {family.name} models")
        if self.opts.lora_format == "comfyui" and not family.comfyui_lora:
            raise UserError(f"--lora_format comfyui is built for SD 1.x and SDXL UNets, not {family.name} models "
                            "(their diffusers file loads in ComfyUI's diffusers loader)")
        if self.opts.train_text_encoder_ti and "textual_inversion" not in family.trainers:
            raise UserError(f"--train_text_encoder_ti is not built for {family.name} models (it learns token "
                            "embeddings, as Textual Inversion, which is not built for them either)")
        if self.opts.train_text_encoder and not family.text_encoder_training:
            raise UserError(f"--train_text_encoder is not built for {family.name} models (its text encoder is read "
                            "at inner layers: train the denoiser, or LoRA adapters)")
        if self.opts.train_text_encoder and self.opts.lora_rank:
            check_peft_for_text_encoder_adapters()

    def full_precision_components(self, family: Family) -> set[str]:
        opts = self.opts  # LoRA: the whole base is frozen (the adapters are added in fp32)
        return set() if opts.lora_rank else {"denoiser", *(family.trained_text_encoders() if opts.train_text_encoder else ())}

    def __init__(self, opts: DreamBoothOptions, accelerator, components: SDComponents | None = None):
        super().__init__(opts, accelerator, components)
        c, device = self.c, accelerator.device
        # the text encoders are part of the trained model when they train whole, or learn new tokens' rows
        self.trains_text = opts.train_text_encoder or opts.train_text_encoder_ti
        text_encoders = TextEncoders(self.family, c.text_encoders, opts.resolution)
        text_encoders.requires_grad_(False)
        if opts.train_text_encoder and not opts.lora_rank:
            text_encoders.train_what_conditions()
        self.new_tokens, self.embeddings = [], []
        if opts.train_text_encoder_ti:  # pivotal tuning: the family's embedding encoders each get the tokens' rows
            self.new_tokens = placeholder_tokens(PIVOTAL_TOKEN, opts.num_new_tokens_per_abstraction)
            self.embeddings = [add_placeholder_tokens(tokenizer, encoder, self.new_tokens, opts.initializer_concept,
                                                      opts.seed, "--token_abstraction") for tokenizer, encoder in
                               list(zip(c.tokenizers, c.text_encoders))[: self.family.embedding_encoders()]]
            if opts.initial_lora:  # the tokens carry on with the LoRA (a sequential stage: they restarted each stage)
                continue_pivotal_rows(self.family, self.embeddings, opts.initial_lora)
        c.denoiser.requires_grad_(not opts.lora_rank)
        if opts.lora_rank:
            from diffusers.training_utils import cast_training_params
            from peft import LoKrConfig, LoraConfig

            # the frozen base in the weight dtype, the adapters in fp32; `prepare` places it (ZeRO-3: a shard per rank)
            c.denoiser.to(self.weight_dtype)
            alpha = opts.lora_alpha or opts.lora_rank
            if opts.initial_lora:  # continued at the strength it was trained with, not at alpha = rank
                alpha = initial_lora_alpha(self.family, opts.initial_lora, opts.lora_alpha) or alpha

            def adapter(targets: list[str]):
                return (LoKrConfig(r=opts.lora_rank, alpha=alpha, target_modules=targets) if opts.lora_type == "lokr" else
                        LoraConfig(r=opts.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                   use_dora=opts.use_dora, target_modules=targets))

            # the adapted modules by component; the text encoders' as diffusers' LoRA scripts (their attention)
            self.lora_modules = {self.family.denoiser: c.denoiser, **({name: text_encoders.encoders[name] for name in
                                 self.family.trained_text_encoders()} if opts.train_text_encoder else {})}
            for name, module in self.lora_modules.items():
                targets = (denoiser_lora_targets(self.family, module, opts.lora_layers) if module is c.denoiser else
                           self.family.text_encoder_lora_targets(name, module))
                with torch.random.fork_rng(devices=[]):  # the adapters' start is a function of --seed, on every launcher
                    torch.manual_seed(derive_seed(opts.seed, "lora-init", *([] if module is c.denoiser else [name])))
                    module.add_adapter(adapter(targets))
                cast_training_params(module, torch.float32)
            if opts.initial_lora:
                load_lora_adapters(self.family, self.lora_modules, opts.initial_lora)
        if opts.gradient_checkpointing:
            c.denoiser.enable_gradient_checkpointing()
            if opts.train_text_encoder:
                for encoder in c.text_encoders:
                    encoder.gradient_checkpointing_enable()
        if not opts.train_text_encoder:
            for encoder in c.text_encoders:  # frozen (pivotal: but for the new rows, placed by `prepare`)
                encoder.to(self.weight_dtype) if opts.train_text_encoder_ti else encoder.to(device, self.weight_dtype)
        for embedding in self.embeddings:  # the cast took the new rows along: they train in fp32
            embedding.new_rows.data = embedding.new_rows.data.float()
        self.model = DreamBoothModel(self.family, c.denoiser, text_encoders if self.trains_text else None,
                                     opts.guidance_scale)

        # Data: a folder's instance images are held in memory; the shards' are read through the on-disk latent
        # store (encoded once for all ranks, host memory of a batch: a style over all of Sketchy fits).
        self.sample_prompts = SamplePrompts.load(opts.instance_prompt, opts.captions, opts.caption_prompt_id)
        # A folder's images are conditioned on their own size and crop, as diffusers' SDXL scripts do (the class
        # images too: drawn at their own size); the shards' on Sketchy's 256 px (the prompt's own)
        instance_geometry = class_geometry = None
        if opts.instance_data_dir:
            instance_images, instance_geometry = load_folder_images(opts.instance_data_dir, opts.resolution,
                                                                    opts.num_instance_images)
            self.keys, self.categories = [""] * len(instance_images), [""] * len(instance_images)
        else:
            instance_images, metas = load_shard_images(opts.shard_dir, opts.split, opts.instance_category or None,
                                                       opts.instance_image_type, opts.resolution, opts.num_instance_images,
                                                       opts.seed, in_memory=False)
            self.keys, self.categories = [m["key"] for m in metas], [m["category"] for m in metas]
        logger.info("%d instance images", len(instance_images))
        self.sample_prompts.check_covers(self.keys, "instance images")
        token = as_word(opts.token_abstraction)
        if opts.train_text_encoder_ti and not any(token.search(self.sample_prompts(k, c)) for k, c in
                                                  zip(self.keys, self.categories)):  # the new rows would never train
            raise UserError(f"--train_text_encoder_ti: no prompt of the instance images has --token_abstraction "
                            f"{opts.token_abstraction!r} (their --captions replace --instance_prompt): put it in the "
                            "captions, or leave --captions out")
        self.sample_prompts.warn_cut(self.family, self.c.tokenizers, self.keys)
        if opts.validation_epochs:  # the loop validates every --validation_steps: this run's, in steps
            per_step = opts.train_batch_size * accelerator.num_processes * opts.gradient_accumulation_steps
            self.opts = opts = dataclasses.replace(
                opts, validation_steps=opts.validation_epochs * -(-len(instance_images) // per_step))
            logger.info("--validation_epochs %d: every %d steps", opts.validation_epochs, opts.validation_steps)
        self.parts = [(self.stream("instance", instance_images, geometry=instance_geometry), self._instance_prompt, 1.0)]
        if opts.with_prior_preservation:
            ensure_class_images(accelerator, opts)
            class_images, class_geometry = load_folder_images(opts.class_data_dir, opts.resolution, opts.num_class_images)
            self.parts.append((self.stream("class", class_images, geometry=class_geometry if opts.instance_data_dir
                                           else None), lambda _: opts.class_prompt, opts.prior_loss_weight))
        self.heldout = self._heldout()
        # Prompts one per category (and the class prompt, ""): token ids when the text encoders train, else their
        # conditioning, computed once with the held-out prompts' before the frozen encoders are released. Captions
        # are too many to keep: encoded with each batch, the encoders stay.
        self.prompts: dict[str, object] = {}
        if self.sample_prompts.per_category:
            prompts = sorted({self.sample_prompts("", c) for c in set(self.categories)}) + [opts.class_prompt] * \
                bool(opts.with_prior_preservation) + [""] * bool(opts.caption_dropout_probability)
            if not self.trains_text:
                self.release_text_encoders(prompts + (self.heldout.prompts if self.heldout is not None else []))
            with torch.no_grad():
                self.prompts = {p: (self.prompt_ids([p]) if self.trains_text else self.condition([p])) for p in prompts}
        # Captions with frozen encoders: too many to keep in memory, each encoded once into an on-disk store (all
        # ranks together, before the clock: `prepare_data`), after which the encoders are released.
        self.text_store: TextStore | None = None
        if not self.sample_prompts.per_category and not self.trains_text:
            extra = [opts.class_prompt] * bool(opts.with_prior_preservation) + [""] * bool(opts.caption_dropout_probability)
            self.text_store = TextStore(opts.latent_cache_dir or Path(opts.output_dir) / "latent_cache",
                                        [*map(self.sample_prompts, self.keys, self.categories), *extra],
                                        text_store_identity(opts, self.family, self.weight_dtype))

    def prepare_data(self, start_step: int) -> None:
        super().prepare_data(start_step)
        if self.text_store is not None and self.frozen_conditions is None:
            self.text_store.build(self.accelerator, self._encode)
            self.release_text_encoders(self.heldout.prompts if self.heldout is not None else [])

    def cache_stats(self) -> dict:
        stats = super().cache_stats()
        return {**stats, "text_store": self.text_store.stats} if self.text_store is not None else stats

    def _instance_prompt(self, index: int) -> str:
        return self.sample_prompts(self.keys[index], self.categories[index])

    def _heldout(self) -> HeldOut | None:
        opts = self.opts
        if not opts.num_heldout_samples or not opts.shard_dir:
            return None
        try:
            images, metas = load_shard_images(opts.shard_dir, opts.validation_split, opts.instance_category or None,
                                              opts.instance_image_type, opts.resolution, opts.num_heldout_samples,
                                              opts.seed)
        except UserError as err:  # no validation images of this category: the held-out loss is skipped, said
            return no_heldout(err, opts.validation_split)
        return HeldOut(images, [self.sample_prompts(m["key"], m["category"]) for m in metas],
                       [m["category"] for m in metas], [m["key"] for m in metas])

    def param_groups(self) -> list[dict]:
        """With --train_text_encoder, the text encoders (or their adapters) in a group of their own at diffusers'
        settings for the family (adapters: SDXL, SD3, FLUX.1 lr 5e-6, weight decay 1e-3, SD 1.x the denoiser's;
        whole encoders: SD3, FLUX.1 5e-6 and 1e-3, SD 1.x and SDXL the denoiser's), or --text_encoder_lr /
        --adam_weight_decay_text_encoder; Prodigy estimates one step size: --learning_rate for both, as diffusers'
        scripts. With --train_text_encoder_ti, those two flags put the new token rows in a group of their own (else
        they train at --learning_rate)."""
        opts = self.opts
        own = self.family.text_encoder_lora_optimizer if opts.lora_rank else self.family.text_encoder_optimizer
        if opts.train_text_encoder_ti and (opts.text_encoder_lr, opts.adam_weight_decay_text_encoder) != (None, None):
            return self._param_groups_apart([e.new_rows for e in self.embeddings], opts.text_encoder_lr,
                                            opts.adam_weight_decay_text_encoder)
        if not opts.train_text_encoder:
            return super().param_groups()
        lr = opts.text_encoder_lr if opts.text_encoder_lr is not None else own[0] if own else None
        decay = (opts.adam_weight_decay_text_encoder if opts.adam_weight_decay_text_encoder is not None else
                 own[1] if own else None)
        if not opts.lora_rank and (lr, decay) == (None, None):  # one group, as train_dreambooth.py (and its checkpoints)
            return super().param_groups()
        return self._param_groups_apart([p for p in self.model.text_encoders.parameters() if p.requires_grad], lr, decay)

    def _param_groups_apart(self, params: list, lr: float | None, decay: float | None) -> list[dict]:
        """The trainable parameters in two groups: `params` at `lr` and `decay` (None: the optimizer's), the rest."""
        ids = {id(p) for p in params}
        group = {"params": params}
        if lr is not None and self.opts.optimizer != "prodigy":
            group["lr"] = lr
        if decay is not None:
            group["weight_decay"] = decay
        return [{"params": [p for p in self.trainable_parameters() if id(p) not in ids]}, group]

    def loss(self, model, step: int, micro: int) -> torch.Tensor:
        """The instance loss, plus the weighted prior-preservation loss on class images: one denoiser call on the
        parts' rows together (as diffusers' script does), not one per part, which would launch every kernel twice."""
        batches = [stream.batch(step, micro) for stream, _, _ in self.parts]
        prompts = [self.row_prompt(stream.name, prompt_of(i), step, micro, i)
                   for (stream, prompt_of, _), batch in zip(self.parts, batches) for i in batch.indices]
        rows = lambda tensors: tensors[0] if len(tensors) == 1 else torch.cat(tensors)  # noqa: E731  no copy for one
        geometry = None if batches[0].geometry is None else rows([b.geometry for b in batches])
        prediction = model(rows([b.noisy for b in batches]), rows([b.timesteps for b in batches]),
                           **self.text_inputs(prompts), geometry=geometry)
        predictions = prediction.split([len(b.noisy) for b in batches])
        return sum(weight * self.loss_of(b, p) for (_, _, weight), b, p in zip(self.parts, batches, predictions))

    def text_inputs(self, prompts: list[str]) -> dict:
        """The model's text input for a batch's prompts: token ids (one tensor per tokenizer) when the text encoders
        train, else their conditioning; from the kept per-category set (a view when the batch shares one prompt),
        or encoded now (captions)."""
        tte = self.trains_text
        if not all(p in self.prompts for p in prompts):
            if tte:
                return {"input_ids": self.prompt_ids(prompts)}
            if self.text_store is not None:
                return {"conditioning": self.text_store(prompts, self.accelerator.device)}
            with torch.no_grad():
                return {"conditioning": self.condition(prompts)}
        n, rows = len(prompts), [self.prompts[p] for p in prompts]
        same = len(set(prompts)) == 1
        if tte:
            return {"input_ids": [i.expand(n, -1) for i in rows[0]] if same else [torch.cat(p) for p in zip(*rows)]}
        return {"conditioning": rows[0].expand(n) if same else Conditioning.cat(rows)}

    def row_prompt(self, stream: str, prompt: str, step: int, micro: int, index: int) -> str:
        """The prompt an image of the batch is trained with: its part's, or "" by caption dropout (instance images)."""
        dropped = stream == "instance" and drops_prompt(self.opts.caption_dropout_probability, self.opts.seed,
                                                        "caption-dropout", step, micro, index)
        return "" if dropped else prompt

    def prompt_transform(self, prompt: str) -> str:
        """Pivotal tuning: --token_abstraction becomes the new tokens, each spelt out (`<s0> <s0>_1`), as diffusers'
        Textual Inversion loader expands `<s0>` at generation."""
        if not self.new_tokens:
            return prompt
        return as_word(self.opts.token_abstraction).sub(" ".join(self.new_tokens), prompt)

    def denoiser_of(self, model):
        return self.accelerator.unwrap_model(model).denoiser

    def text_encoder_of(self, model):
        # the trained first encoder (the pipeline and `condition` take the others from the components: the same
        # module objects that DDP/DeepSpeed train in place)
        trained = self.accelerator.unwrap_model(model).text_encoders
        return trained.encoders["text_encoder"] if trained is not None else self.c.text_encoder

    def validation_rows(self) -> list[tuple[str, str | None]]:
        """(prompt, category) of each validation row: --validation_prompt's, else the instance prompt's; one naming
        {category} gives a row per category of the run (the instance category, or the set's first four)."""
        o = self.opts
        categories = [o.instance_category] if o.instance_category else self.categories
        return validation_rows(o.validation_prompt or [o.instance_prompt], categories, o.instance_category or None,
                               [o.instance_prompt])

    def validation_prompts(self) -> list[str]:
        return [prompt for prompt, _ in self.validation_rows()]

    def user_prompt(self, prompt: str) -> str:
        """Pivotal tuning: the new tokens by the name a user loads them under (`<s0>`; diffusers' loader spells out
        the rest), not --token_abstraction."""
        if not self.new_tokens:
            return prompt
        return as_word(self.opts.token_abstraction).sub(PIVOTAL_TOKEN, prompt)

    def card_prompt(self) -> str:
        return self.user_prompt(super().card_prompt())

    def validation_categories(self) -> list[str | None]:
        return [category for _, category in self.validation_rows()]

    def on_checkpoint(self, accelerator, model, step: int) -> None:
        """A LoRA run's checkpoint also holds its adapters as the final save writes them (the average with --use_ema):
        `load_lora_weights("checkpoint-N")` in plain diffusers, as diffusers' DreamBooth LoRA checkpoints, or
        `infer/generate.py --pretrained_model_name_or_path OUT/checkpoint-N`; steps are compared without a resume."""
        if self.opts.lora_rank:
            self.save_final(accelerator, model, Path(self.opts.output_dir) / f"checkpoint-{step}")

    def save_final(self, accelerator, model, out: Path) -> None:
        """LoRA: `pytorch_lora_weights.safetensors`; full: a diffusers pipeline, in `out`."""
        opts = self.opts

        def write(state: dict[str, torch.Tensor]) -> None:  # the fp32 master weights
            if opts.lora_rank:
                from peft.utils import get_peft_model_state_dict

                # each adapted component's adapters (peft's names) from its part of the model's state
                prefixes = {name: "denoiser." if name == self.family.denoiser else f"text_encoders.encoders.{name}."
                            for name in self.lora_modules}
                layers = {name: get_peft_model_state_dict(module, state_dict={
                    k[len(prefixes[name]):]: v for k, v in state.items() if k.startswith(prefixes[name])})
                    for name, module in self.lora_modules.items()}
                layers = {name: part if name == self.family.denoiser else
                          self.family.encoder_checkpoint_names(self.lora_modules[name], part)
                          for name, part in layers.items()}
                if self.new_tokens:  # pivotal tuning: the tokens' rows (encoder order) in Textual Inversion's file
                    write_learned_embeds(self.family, PIVOTAL_TOKEN, [v for k, v in state.items()
                                                                       if k.endswith(".new_rows")],
                                         out / "learned_embeds.safetensors")
                if opts.lora_type == "lokr":
                    from sketch2real.lokr import write_lokr

                    config = self.denoiser_of(model).peft_config["default"]
                    write_lokr(out, layers[self.family.denoiser], config.alpha, config.r, sorted(config.target_modules),
                               self.family.lokr_prefix)
                    return
                # Each adapter's settings (alpha above all) go into the file's metadata, where diffusers' loader
                # reads them; without them it reloads alpha = rank.
                arguments = {}
                for name, module in self.lora_modules.items():
                    layers_argument, metadata_argument = self.family.lora_file_arguments(name)
                    arguments[layers_argument] = (self.family.lora_file_layers(layers[name]) if name == self.family.denoiser
                                                  else encoder_lora_file_layers(self.family.lora_file_layers(layers[name])))
                    arguments[metadata_argument] = lora_file_metadata(module.peft_config["default"])
                pipeline_class(self.family).save_lora_weights(out, **arguments, safe_serialization=True)
                sort_safetensors_metadata(out / "pytorch_lora_weights.safetensors")  # the same bytes run after run
                umask_modes(out / "pytorch_lora_weights.safetensors")  # diffusers writes it 0600 through a temp file
                if opts.lora_format == "comfyui":
                    from safetensors.torch import save_file

                    alpha = self.lora_modules[self.family.denoiser].peft_config["default"].lora_alpha
                    kohya = self.family.comfyui_lora_layers(layers, alpha)
                    with atomic_path(out / "pytorch_lora_weights_comfyui.safetensors") as tmp:
                        save_file({k: v.contiguous() for k, v in kohya.items()}, tmp, metadata={
                            "format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(opts.lora_rank),
                            "ss_network_alpha": str(alpha)})
                        sort_safetensors_metadata(tmp)
            else:
                save_pipeline(opts, state, out)

        self.write_on_main(model, write)


def initial_lora_alpha(family: Family, folder: str, lora_alpha: float) -> float | None:
    """The alpha a saved LoRA folder was trained with (the adapter settings diffusers keeps in the file; None in a
    file without them); a different `--lora_alpha` given for it is refused in one line."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(Path(folder) / "pytorch_lora_weights.safetensors", "pt") as f:
        settings = json.loads((f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
    saved = settings.get(f"{family.denoiser}.lora_alpha")
    if saved is not None and lora_alpha and lora_alpha != saved:
        raise UserError(f"--initial_lora {folder} was trained with alpha {saved:g}, not --lora_alpha {lora_alpha:g}: "
                        "leave --lora_alpha out to continue it at its own")
    return saved


def continue_pivotal_rows(family: Family, embeddings: list, folder: str) -> None:
    """Start pivotal tuning's new rows (`embeddings`, one per embedding encoder) from those a LoRA folder's run learned
    (its `learned_embeds.safetensors`; none there: they start afresh); rows of another count or width are one line."""
    path = Path(folder) / "learned_embeds.safetensors"
    if not path.is_file():
        return
    names = family.learned_embedding_keys() or (PIVOTAL_TOKEN,)  # (SD 1.x: one tensor named by the token)
    _, _, tensors = embedding_file(str(path), names)
    for embedding, rows in zip(embeddings, [tensors.get(name) for name in names]):
        if rows is None or rows.shape != embedding.new_rows.shape:
            raise UserError(f"--initial_lora {folder}: its learned tokens ({path.name}: "
                            f"{'none' if rows is None else ' x '.join(map(str, rows.shape))}) do not fit this run's "
                            f"({' x '.join(map(str, embedding.new_rows.shape))}: --num_new_tokens_per_abstraction)")
        with torch.no_grad():
            embedding.new_rows.copy_(rows.to(embedding.new_rows))


def denoiser_lora_targets(family: Family, denoiser: torch.nn.Module, lora_layers: str = "") -> list[str]:
    """peft `target_modules` of the denoiser's adapters: `--lora_layers` (comma-separated) or the family's; a name that
    matches no module of this denoiser (peft's own rule: the whole name or its ending after a dot) is one line."""
    if not lora_layers:
        return family.lora_targets(denoiser)
    targets = [name.strip() for name in lora_layers.split(",") if name.strip()]
    names = [name for name, _ in denoiser.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown or not targets:
        raise UserError(f"--lora_layers {lora_layers}: {', '.join(unknown) or 'no name'} matches no module of this "
                        f"{family.denoiser_class} (its default: {','.join(family.lora_targets(denoiser))})")
    return targets


def encoder_lora_file_layers(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text encoder's adapter weights as its loader reads them: a DoRA magnitude as `...lora_magnitude_vector.weight`.
    transformers' adapter loader (behind diffusers' `load_lora_weights` for text encoders) matches only that name and
    reset peft's `...lora_magnitude_vector` silently to the base weight's row norms: the trained magnitudes lost."""
    return {f"{k}.weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in layers.items()}


def load_lora_adapters(family: Family, modules: dict[str, torch.nn.Module], folder: str) -> None:
    """Set the (freshly added) LoRA adapters of `modules` (by component: the denoiser, the text encoders) to the weights
    of a saved LoRA folder, as diffusers' scripts resume theirs; one line when they do not fit (another rank, another
    base, text encoder adapters that this run would drop). A text encoder the file has no adapters for starts fresh."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft import set_peft_model_state_dict

    saved = pipeline_class(family).lora_state_dict(folder)
    saved = saved[0] if isinstance(saved, tuple) else saved  # SD's loader also returns the network alphas
    components = {k.split(".", 1)[0] for k in saved}
    if components - set(modules):
        raise UserError(f"--initial_lora {folder} also adapts {', '.join(sorted(components - set(modules)))}: give "
                        "--train_text_encoder to continue it whole")
    for name, module in modules.items():
        part = {k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(f"{name}.")}
        if not part and name != family.denoiser:
            logger.info("--initial_lora %s has no %s adapters: they start fresh", folder, name)
            continue
        state = (family.lora_adapter_layers(part) if name == family.denoiser else family.encoder_checkpoint_names(
                 module, convert_state_dict_to_peft(convert_state_dict_to_diffusers(part)), saving=False))
        if name != family.denoiser:  # diffusers' SDXL script also adapts the unread last layer: untrained, left out
            targets = set(family.text_encoder_lora_targets(name, module))
            state = {k: v for k, v in state.items() if k.split(".lora_")[0] in targets}
        try:
            result = set_peft_model_state_dict(module, state, adapter_name="default")
        except RuntimeError as err:  # a shape mismatch: another --lora_rank
            raise UserError(f"--initial_lora {folder} does not fit these adapters: {str(err).strip().splitlines()[-1]} "
                            "(use the --lora_rank it was trained with)") from err
        missing = [k for k in result.missing_keys if "lora_" in k]
        if not state or missing or result.unexpected_keys:
            dora = ("; it is a DoRA (magnitude vectors): give --use_dora" if any("lora_magnitude_vector" in k for k in
                    result.unexpected_keys) else "; it is a plain LoRA (no magnitude vectors): leave out --use_dora"
                    if any("lora_magnitude_vector" in k for k in missing) else "")
            raise UserError(f"--initial_lora {folder} does not fit this model's {name} adapters "
                            f"({len(state)} saved tensors, {len(missing)} adapters missing){dora}")


def save_pipeline(opts: TrainOptions, state: dict[str, torch.Tensor], out: Path) -> None:
    """Write base pipeline + trained weights (`denoiser.*`, `text_encoders.encoders.<component>.*` in `state`) at `out`.

    Fresh modules are loaded from the base and given the trained weights, which
    works the same for 1 process, DDP, ZeRO-2 and ZeRO-3.
    """
    family = family_of(opts.pretrained_model_name_or_path, opts.revision)
    pipe = load_base_pipeline(family, opts.pretrained_model_name_or_path, opts.revision, opts.variant,
                              opts.pretrained_vae_model_name_or_path)
    set_trained_weights(pipe, family, state)
    save_pretrained_atomic(pipe, out)


def set_trained_weights(pipe, family: Family, state: dict[str, torch.Tensor]) -> None:
    """Give a base pipeline's components the trained weights of a `DreamBoothModel` (`denoiser.*`,
    `text_encoders.encoders.<component>.*` in `state`, the names its checkpoints and final save use)."""
    prefixes = {family.denoiser: "denoiser.", **{name: f"text_encoders.encoders.{name}." for name in family.text_encoders}}
    found = False
    for name, prefix in prefixes.items():
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            found = True
            unexpected = getattr(pipe, name).load_state_dict(part, strict=False).unexpected_keys
            if unexpected:
                raise UserError(f"trained {name} weights do not fit the base model: {unexpected[:3]}")
    if not found:
        raise UserError(f"no trained {family.denoiser} or text encoder weights (names: {sorted(state)[:2]}): "
                        "not a DreamBooth run's")
