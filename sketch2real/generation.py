"""Batched, data-parallel, resumable image generation with seeds independent of the world size.

Items (key, prompt, category, optional sketch key) are sorted by key and cut into
batches *before* they are dealt to ranks, so a batch holds the same items on 1, 2
or 8 processes; each image's generator is seeded from (global seed, key) only.
Together these make the images bit-identical whatever the number of processes.
"""

from __future__ import annotations

import json
import logging
import re
import string
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest.mock import patch

import torch
from PIL import Image

from sketch2real.captioning import CAPTION_FIELDS, CAPTION_TEXT
from sketch2real.cli import PRECISION_HELP, UserError, as_dict, check_output_dir, option, options_affecting
from sketch2real.family import NOISE_SAMPLERS, check_lora_family
from sketch2real.io import (
    atomic_path,
    check_same_settings,
    differences,
    key_path,
    merge_parts,
    read_jsonl,
    read_saved_options,
    read_with_parts,
    refuse_other_settings,
    write_jsonl,
)
from sketch2real.models import requested_precision, weight_files_identity
from sketch2real.shards import CorruptSample, corrupt_samples, open_image
from sketch2real.sketchy import category_words, check_template
from sketch2real.training.checkpoints import TRAIN_STATE, checkpoint_weights, read_train_state
from sketch2real.training.diffusion import derive_seed

logger = logging.getLogger("sketch2real")

TEMPLATE_FIELDS = {"category", "key", "caption"}


@dataclass
class Item:
    """One image to generate."""

    key: str
    prompt: str
    category: str = ""
    sample_key: str = ""  # the Sketchy sample (sketch/photo pair) it belongs to, if any
    extra: dict = field(default_factory=dict)


def check_generation_template(template: str, fields: Collection[str] = TEMPLATE_FIELDS) -> None:
    """A generation prompt template may use {category}, {key} and {caption} (`fields`); anything else is one line."""
    check_template(template, {*fields, "caption"})  # (a stray brace: one line before the parse below)
    if "caption" not in fields and any(name == "caption" for _, name, _, _ in string.Formatter().parse(template)):
        raise UserError("the prompt template's {caption} needs --captions (a captions file of infer/caption.py)")


def items_from_template(template: str, shard_dir: str, split: str, categories: Sequence[str] | None) -> list[Item]:
    """One item per sample of a split: the template filled with the sample's category."""
    from sketch2real.shards import sample_refs

    check_generation_template(template, TEMPLATE_FIELDS - {"caption"})
    return [Item(key=ref.key, prompt=template.format(category=category_words(ref.category), key=ref.key),
                 category=ref.category, sample_key=ref.key) for ref in sample_refs(shard_dir, split, categories)]


def first_samples_per_category(items: list[Item], limit: int, order: Sequence[str] | None = None) -> list[Item]:
    """The items of the first `limit` samples of each category (`--max_per_category`), taken in `order` (sample keys:
    the shards', so a captions set draws the same sketches as a template set), then in the items' own."""
    category = {it.sample_key: it.category for it in items}
    ordered = set(order or ())
    chosen, counts = set(), {}
    for key in [*(k for k in order or () if k in category), *(k for k in category if k not in ordered)]:
        counts[category[key]] = counts.get(category[key], 0) + 1
        if counts[category[key]] <= limit:
            chosen.add(key)
    return [it for it in items if it.sample_key in chosen]


def items_from_captions(path: str, prompt_ids: Sequence[str] | None, template: str = "{caption}") -> list[Item]:
    """One item per caption row (key, category, prompt_id, caption) of a captioning JSONL."""
    if not Path(path).is_file():
        raise UserError(f"captions file not found: {path}")
    check_generation_template(template)
    rows = read_jsonl(path, required=CAPTION_FIELDS, text=CAPTION_TEXT)
    wanted = set(prompt_ids or [])
    items, seen, empty = [], set(), 0
    for row in rows:
        if wanted and str(row.get("prompt_id")) not in wanted:
            continue
        key = f"{row['key']}/{row['prompt_id']}"
        if key in seen:  # one image per (key, prompt_id): a second caption would name an image drawn from the first
            raise UserError(f"{path}: two captions of sample {row['key']} under prompt id {row['prompt_id']} (two "
                            "captioning runs joined?): give each (key, prompt_id) once, e.g. another prompt_id per run")
        seen.add(key)
        caption = row["caption"].strip()
        empty += not caption
        prompt = template.format(caption=caption, category=category_words(row.get("category", "")), key=row["key"])
        items.append(Item(key=key, prompt=prompt, category=row.get("category", ""),
                          sample_key=row["key"], extra={"prompt_id": row["prompt_id"]}))
    if not items:
        raise UserError(f"no captions in {path}" + (f" for prompt ids {sorted(wanted)}" if wanted else ""))
    if empty:  # a captioner's "" (BLIP-2 gives it to some questions): drawn as written, counted in FID and CLIP score
        logger.warning("%d captions in %s are empty: their images are drawn from %s", empty, path,
                       "an empty prompt (unconditional)" if template.strip() == "{caption}" else f"{template!r} without one")
    absent = sorted(wanted - {str(row.get("prompt_id")) for row in rows})
    if absent:  # the others' images only, without a word, before
        raise UserError(f"--prompt_ids {' '.join(absent)}: no captions of {'that id' if len(absent) == 1 else 'those ids'} "
                        f"in {path} (its ids: {' '.join(sorted({str(row.get('prompt_id')) for row in rows}))})")
    return items


def items_from_prompts(prompts: Sequence[str]) -> list[Item]:
    """One item per prompt; `.txt` paths (every one given) are files of prompts, one a line, blank lines skipped."""
    given_file = next((p for p in prompts if p.lower().endswith(".txt") and Path(p).is_file()), None)
    if given_file and not all(p.lower().endswith(".txt") for p in prompts):  # the file's name was drawn
        raise UserError(f"--prompts {given_file} is a file given beside prompts: give prompt files alone (read a "
                        "prompt a line), or prompts alone")
    if prompts and all(p.lower().endswith(".txt") for p in prompts):  # not drawn as their own words
        files, prompts = prompts, []
        for path in map(Path, files):
            if not path.is_file():
                raise UserError(f"--prompts {path}: no such file (.txt files given are read as prompts, one a line)")
            try:  # a BOM an editor put first is not part of the first prompt (it tokenized as three odd tokens)
                lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
            except UnicodeDecodeError as err:
                raise UserError(f"--prompts {path}: not UTF-8 text ({err.reason} at byte {err.start}): save it as "
                                "UTF-8") from None
            if not lines:
                raise UserError(f"--prompts {path}: the file holds no prompt")
            prompts += lines
    return [Item(key=f"prompt-{i:04d}", prompt=p) for i, p in enumerate(prompts)]


def expand(items: list[Item], num_images_per_prompt: int) -> list[Item]:
    """Item -> `num_images_per_prompt` images, keyed `<key>/<i>` when more than one."""
    if num_images_per_prompt == 1:
        return items
    return [Item(f"{it.key}/{i}", it.prompt, it.category, it.sample_key, {**it.extra, "image_index": i})
            for it in items for i in range(num_images_per_prompt)]


T = TypeVar("T")


def image_path(output_dir: Path, key: str) -> Path:
    """images/<key>.png; a key that could leave the folder (`..`, absolute, NUL) is refused (`key_path`)."""
    return key_path(Path(output_dir) / "images", key, ".png")


def rank_batches(items: list[Item], batch_size: int, rank: int, world_size: int) -> list[list[Item]]:
    """Batches of the sorted item list, dealt round-robin: batch contents do not depend on the world size."""
    ordered = sorted(items, key=lambda it: it.key)
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    return batches[rank::world_size]


def finished_rows(output_dir: Path) -> dict[str, dict]:
    """Index rows (merged or in a rank's part file; the newest of a key) of the keys with an image on disk."""
    return {r["key"]: r for r in read_with_parts(output_dir, "index") if image_path(output_dir, r["key"]).is_file()}


CONFIG = "generate_config.json"
# generate_config.json's key beside the options: what the weights' paths held (named anew when what it records
# changes, so that a config of the older record compares the weights by path and a requeued job onto an upgraded
# checkout goes on: "weights_data" had a file's size alone, "weights_content" a sketch2real run's record alone)
WEIGHTS_DATA = "weights_identity"
SHARDS_DATA = "shards_data"  # and what the shards held (their index's hash)


def weights_identity(path: str) -> str:
    """What a model, LoRA, ControlNet or embeddings path holds, as a resumed generation compares it: its weight files'
    names, sizes and a hash of 1 MiB at their start, middle and end (weights trained again keep their size: sizes
    alone let a resume draw the rest with other weights), with a sketch2real run's record (metrics.json's fingerprint,
    steps and outputs' sizes; a checkpoint's train_state.json); a hub id (or "") as written. A run trained again in
    place has another (the same command on edited images of --instance_data_dir too); a copy elsewhere is the same."""
    import hashlib

    where = Path(path) if path else None
    if where is None or not where.exists():
        return path
    folder = where if where.is_dir() else where.parent
    for record, keys in ((folder / "metrics.json", ("fingerprint", "steps", "outputs")),
                         (folder / TRAIN_STATE, ("fingerprint", "step"))):
        saved = read_saved_options(record)
        if saved is not None and saved.get("fingerprint") is not None:
            held = {k: saved.get(k) for k in keys} | {"weights": weight_files_identity(where)}
            break
    else:  # not ours (a downloaded or converted model): its weight files
        return weight_files_identity(where)
    return hashlib.sha256(json.dumps(held, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_data(opts) -> dict[str, Any]:
    """`weights_identity` of each trained part a generation loads (model, LoRA, ControlNet, embeddings)."""
    return {"model": weights_identity(opts.pretrained_model_name_or_path), "lora": weights_identity(opts.lora),
            "controlnet": weights_identity(opts.controlnet),
            "textual_inversion": [weights_identity(p) for p in opts.textual_inversion]}


def image_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a generation job's options (`as_dict`) that determines its images: those that affect the result
    (`option(affects=...)`: not how the job runs, nor which items it draws, an image's key, prompt and seed being
    its item's own), an option the job did not save counting as its default; the shards only where the prompts
    (a template over a split) or the ControlNet's sketches come from them, not where only the mosaics do."""
    defaults = as_dict(GenerateOptions())
    result = options_affecting(GenerateOptions, "result")
    settings = {k: options.get(k, v) for k, v in defaults.items() if k in result}
    if not (settings["controlnet"] or (settings["prompt_template"] and not settings["captions"])):
        del settings["shard_dir"], settings["split"]
    elif options.get(SHARDS_DATA):  # the shards by what they hold: rebuilt in place (another rendering), not the same
        settings["shard_dir"] = options[SHARDS_DATA]
    if options.get(WEIGHTS_DATA) is not None:  # a model or LoRA trained again at the same path is another
        settings[WEIGHTS_DATA] = options[WEIGHTS_DATA]
    return settings


def resumable_keys(output_dir: Path, options: Mapping[str, Any], items: Sequence[Item]) -> set[str]:
    """The keys already drawn in `output_dir` (`finished_rows`), provided they were drawn under these settings.

    A folder whose generate_config.json has other `image_settings`, or where a drawn key had another prompt (a
    captions file captioned again under the same name), is refused in one line: a resume would keep images of
    other settings beside a config describing these. A folder without the config (an older version's) resumes.
    """
    rows = finished_rows(output_dir) if output_dir.is_dir() else {}
    saved = read_saved_options(output_dir / CONFIG) if rows else None
    if saved is not None:  # a config saved before the weights and shards were known by what they hold: by path
        options = {k: v for k, v in options.items() if k not in (WEIGHTS_DATA, SHARDS_DATA) or k in saved}
    if not rows or check_same_settings(output_dir, CONFIG, options, image_settings, "images") is None:
        return set(rows)
    prompts = {it.key: it.prompt for it in items}
    changed = sorted(k for k, row in rows.items() if k in prompts and row.get("prompt") != prompts[k])
    refuse_other_settings(output_dir, "images", differences({f"prompt of {k}": prompts[k] for k in changed},
                                                            {f"prompt of {k}": rows[k].get("prompt") for k in changed}))
    return set(rows)


def merge_index(output_dir: Path) -> list[dict]:
    """Fold the ranks' part files into index.jsonl (sorted, one row per key with an image) and remove them. Rows
    of a version that did not record `generator_seed` get it (the same derivation drew them)."""
    rows = merge_parts(output_dir, "index", key=lambda r: r["key"], keep=lambda r: image_path(output_dir, r["key"]).is_file())
    older = [row for row in rows if "generator_seed" not in row and isinstance(row.get("seed"), int)]
    for row in older:
        row["generator_seed"] = derive_seed(row["seed"], row["key"])
    if older:
        write_jsonl(Path(output_dir) / "index.jsonl", rows)
    return rows


def run_config_of(folder: Path) -> Path | None:
    """The `run_config.json` of a training output folder, or of the run a `checkpoint-N` folder is of; None: none."""
    for config in (folder / "run_config.json", folder.parent / "run_config.json"):
        if config.is_file() and (config.parent == folder or re.fullmatch(r"checkpoint-\d+", folder.name)):
            return config
    return None


def holds_lora_adapters(folder: Path) -> bool:
    """Whether a folder holds LoRA weights (diffusers', kohya's/ComfyUI's or LoKr's file), as a LoRA run saves them."""
    from sketch2real.lokr import LOKR_FILE

    return any(folder.glob("pytorch_lora_weights*.safetensors")) or (folder / LOKR_FILE).is_file()


def base_of_lora_output(model: str, lora: str) -> tuple[str, str]:
    """(model, lora) to load, where `model` may be a LoRA training output (LoRA weights and run_config.json, no
    pipeline): its base model with the folder's LoRA, so `MODEL=runs/dreambooth_cat` works for LoRA and full runs alike."""
    folder = Path(model)
    if not holds_lora_adapters(folder) or (folder / "model_index.json").is_file():
        return model, lora
    if lora:
        raise UserError(f"{model} holds LoRA weights, not a pipeline, and --lora is given too: give the base model")
    config = run_config_of(folder)
    base = json.loads(config.read_text()).get("pretrained_model_name_or_path") if config else None
    if not base:
        raise UserError(f"{model} holds LoRA weights, not a pipeline: give its base model as --pretrained_model_name_or_path "
                        "and this folder as --lora")
    check_recorded_base(base, config, model)
    logger.info("%s holds LoRA weights: loading them into their base model %s", model, base)
    return base, model


def recorded_values(sources: Sequence[str], key: str) -> dict[str, tuple[Any, str]]:
    """The values of the option `key` the training runs behind `sources` (a model or LoRA output folder, a checkpoint
    of one, a ControlNet folder, an embeddings file) were given, from their `run_config.json`, each once (by its JSON)
    with the first source that gave it; none where no run gave one."""
    values: dict[str, tuple[Any, str]] = {}
    for source in filter(None, sources):
        if not Path(source).exists():  # a hub id: no run of ours
            continue
        config = run_config_of(Path(source) if Path(source).is_dir() else Path(source).parent)
        try:
            value = json.loads(config.read_text()).get(key) if config else None
        except (OSError, ValueError, AttributeError):  # not a training run's record
            value = None
        if value not in (None, ""):
            values.setdefault(json.dumps(value), (value, source))
    return values


def recorded_by_runs(sources: Sequence[str], key: str, what: str) -> Any:
    """The option `key` the training runs behind `sources` were given (`recorded_values`); None where none gave one.
    One line when two differ (`what` names it): the generation cannot match both."""
    values = recorded_values(sources, key)
    if len(values) > 1:
        named = ", ".join(f"{source}: {value}" for value, source in values.values())
        raise UserError(f"these were trained with different {what} ({named}): give --{key}")
    return next(iter(values.values()), (None, ""))[0]


def trained_sequence_length(sources: Sequence[str]) -> int | None:
    """The `--max_sequence_length` the training runs behind `sources` were given (`recorded_by_runs`)."""
    length = recorded_by_runs(sources, "max_sequence_length", "prompt lengths (tokens)")
    return length if isinstance(length, int) else None


def trained_on_own_images(sources: Sequence[str]) -> bool:
    """Whether a training run behind `sources` trained on a folder of the user's images (`--instance_data_dir`,
    `--train_data_dir`), not the shards: its SDXL images are drawn with the pipeline's own time ids
    (`Family.with_own_images`)."""
    return any(recorded_values(sources, key) for key in ("instance_data_dir", "train_data_dir"))


def trained_vae(sources: Sequence[str]) -> str:
    """The `--pretrained_vae_model_name_or_path` the training runs behind `sources` trained and validated with ("":
    the model's own VAE): their images drawn with another VAE are not theirs (an SDXL run's fp16-fix VAE)."""
    return recorded_by_runs(sources, "pretrained_vae_model_name_or_path", "VAEs") or ""


def check_recorded_base(base: str, source: Path, folder: str) -> None:
    """`check_model_path` of a base model a training run recorded (in `source`: run_config.json or its checkpoint's
    state), whose error says where the path came from: a relative one is relative to where training ran."""
    from sketch2real.models import check_model_path

    try:
        check_model_path(base)
    except UserError as err:
        raise UserError(f"{err}; it is the base model of {folder} as {source} records it (a path relative to where "
                        "training ran? run from there, or give the base model and the adapters apart: "
                        f"--pretrained_model_name_or_path BASE --lora {folder})") from None


def full_run_checkpoint(model: str) -> Path | None:
    """`model` as a full fine-tune's `checkpoint-N` (trained weights, no pipeline: `checkpoint_weights` reads them), or
    None: `infer/generate.py --pretrained_model_name_or_path OUT/checkpoint-N` compares steps as a LoRA run's does."""
    folder = Path(model)
    if folder.is_dir() and (folder / TRAIN_STATE).is_file() and not (folder / "model_index.json").is_file():
        return folder
    return None


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+?): copying a param with shape torch\.Size\((\[.*?\])\) from checkpoint, "
                            r"the shape in current model is torch\.Size\((\[.*?\])\)")


def lora_problem(lora: str, model: str, err: Exception) -> str | None:
    """The one-line error of LoRA (or LoKr) weights that cannot be loaded into `model`; None for an error that is not
    the weights' (out of memory: its traceback stays)."""
    text = str(err).strip()
    match = _SIZE_MISMATCH.search(text)
    if match:  # name the module, not peft's parameter of the adapter inside it
        module = re.sub(r"\.lora_[AB](\.[^.]+)?\.weight$", "", match[1])
        return (f"--lora {lora} does not fit the base model {model} (size mismatch in {module}: {match[2]} in the LoRA, "
                f"{match[3]} in the model: trained for another architecture?)")
    first = text.splitlines()[0] if text else type(err).__name__
    if "is invalid for input of size" in text:  # a LoKr update that cannot take the shape of the model's weight
        return f"--lora {lora} does not fit the base model {model} ({first}: trained for another architecture?)"
    if isinstance(err, RuntimeError):
        return None
    return f"cannot load LoRA weights {lora} into {model}: {_clipped(first)}"


def _clipped(text: str, limit: int = 200) -> str:
    """A loader's message cut to one readable line (some print the tensor they refused)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextmanager
def _without_adapter_error_log() -> Iterator[None]:
    """Leave out diffusers' multi-line log of an adapter that failed to load, and peft's warnings about it (a
    RuntimeWarning listing every module, 1.8k characters): the error is raised anyway, and `lora_problem` words it
    in one line. The warnings of a load that succeeds (keys it did not use) are shown."""
    def keep(record: logging.LogRecord) -> bool:
        return "was unsuccessful with the following error" not in record.getMessage()

    peft_logger = logging.getLogger("diffusers.loaders.peft")
    peft_logger.addFilter(keep)
    try:
        with warnings.catch_warnings(record=True) as held:
            yield
        for caught in held:  # loaded: what peft said about it stands
            warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
    finally:
        peft_logger.removeFilter(keep)


def check_lora_folder(lora: str) -> None:
    """One line, before any weight loads, for a --lora folder that holds something else: a pipeline (a full fine-tune's
    output) or a Textual Inversion run's embeddings (diffusers' loader said so after the model had loaded)."""
    folder = Path(lora)
    if not lora or not folder.is_dir():
        return
    if (folder / "model_index.json").is_file():
        raise UserError(f"--lora {lora} is a pipeline (model_index.json), no LoRA: give it as --pretrained_model_name_or_path")
    if not holds_lora_adapters(folder) and (folder / "learned_embeds.safetensors").is_file():
        raise UserError(f"--lora {lora} holds Textual Inversion embeddings, no LoRA: give --textual_inversion "
                        f"{folder / 'learned_embeds.safetensors'}")


def load_generation_pipeline(model: str, device: torch.device, dtype: torch.dtype, scheduler: str = "",
                             textual_inversion: Sequence[str] = (), lora: str = "", lora_scale: float = 1.0,
                             controlnet: str = "", safety_checker: bool = False, xformers: bool = False,
                             compile_denoiser: bool = False, revision: str | None = None, sizes: Sequence[int | None] = (),
                             max_sequence_length: int | None = None, vae: str = ""):
    """A (ControlNet) pipeline of the model's family (SD 1.x/2.x, SDXL, SD3, FLUX.1, FLUX.2 [klein]) with optional TI embeddings and
    LoRA fused in, and `vae` (a hub id or folder) in place of the model's own if given. `sizes`: the image sides
    asked for, and `max_sequence_length` the prompts' length, checked against the family before any weight loads."""
    import diffusers

    from sketch2real.family import check_controlnet_class, controlnet_mismatch, family_of, load_textual_inversion
    from sketch2real.models import check_model_path, enable_xformers, load, load_base_pipeline

    model, lora = base_of_lora_output(model, lora)
    for file in textual_inversion:  # before any weight loads
        if not Path(file).exists():
            raise UserError(f"textual inversion embeddings not found: {file}")
    if lora and not Path(lora).exists():
        raise UserError(f"LoRA weights not found: {lora}")
    check_lora_folder(lora)
    if lora and (Path(lora) / "learned_embeds.safetensors").is_file():  # pivotal tuning: its tokens beside the LoRA
        textual_inversion = [*textual_inversion, str(Path(lora) / "learned_embeds.safetensors")]
    checkpoint = full_run_checkpoint(model)
    if checkpoint is not None:  # its base model, as the run loaded it, with the checkpoint's weights
        run = read_train_state(checkpoint)["fingerprint"]
        model, revision = run["pretrained_model_name_or_path"], run.get("revision")
        check_recorded_base(model, checkpoint / TRAIN_STATE, str(checkpoint))
        logger.info("%s is a checkpoint of a full fine-tune: its trained weights in its base model %s", checkpoint, model)
    check_model_path(model)
    family = family_of(model, revision)
    bad = [side for side in sizes if side and side % family.resolution_multiple]
    if bad:  # SD3 stopped with a traceback, FLUX.1 drew another size than the index recorded
        raise UserError(f"--height/--width {bad[0]} is not a multiple of {family.resolution_multiple}, which {family.name} "
                        "models need (the VAE's downsampling, x2 for the transformer's patches)")
    family.with_max_sequence_length(max_sequence_length)
    if lora:
        check_lora_family(lora, family, "--lora", model)
    if scheduler and scheduler not in family.samplers():  # before any weight loads
        raise UserError(f"--scheduler {scheduler} does not fit {family.name} models, trained for another objective "
                        f"(theirs: {', '.join(family.samplers())})")
    for flag, given, trainer in (("--controlnet", controlnet, "controlnet"),
                                 ("--textual_inversion", textual_inversion, "textual_inversion")):
        if given and trainer not in family.trainers:  # a traceback after the model loaded (no pipeline or loader)
            raise UserError(f"{flag}: {model} is a {family.name} model, which takes no {trainer.replace('_', ' ')} "
                            f"(its models here: {', '.join(family.trainers)})")
    if controlnet:
        check_controlnet_class(controlnet, family, "--controlnet", model)
    net = load(getattr(diffusers, family.controlnet_class), controlnet, "ControlNet", dtype=dtype) if controlnet else None
    if checkpoint is None:
        pipe = load_base_pipeline(family, model, revision, None, vae, dtype, net, safety_checker)
    else:
        from sketch2real.training.dreambooth import set_trained_weights

        pipe = load_base_pipeline(family, model, revision, run.get("variant"),
                                  vae or run.get("pretrained_vae_model_name_or_path"), dtype, net, safety_checker)
        set_trained_weights(pipe, family, checkpoint_weights(checkpoint))
    mismatch = controlnet_mismatch(net, getattr(pipe, family.denoiser)) if net is not None else ""
    if mismatch:  # it would end in a traceback at the first image
        raise UserError(f"--controlnet {controlnet} is not a ControlNet of {model} ({mismatch})")
    if scheduler:
        pipe.scheduler = getattr(diffusers, family.samplers()[scheduler]).from_config(pipe.scheduler.config)
    for file in textual_inversion:
        try:
            load_textual_inversion(pipe, file)
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # an SD 1.x embedding given to SDXL, not a file of
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__  # embeddings
            raise UserError(f"cannot load textual inversion embeddings {file} into {model}: {_clipped(first)}") from err
    if lora:
        from sketch2real.lokr import LOKR_FILE, merge_lokr

        lokr = Path(lora) / LOKR_FILE if Path(lora).is_dir() else Path(lora)
        try:
            if lokr.name == LOKR_FILE and lokr.is_file():  # diffusers reads no LoKr file
                merge_lokr(getattr(pipe, family.denoiser), lokr, lora_scale)
            else:
                with _without_adapter_error_log():
                    pipe.load_lora_weights(lora)
                if not pipe.get_list_adapters():  # diffusers warns of keys that fit no module, and loads nothing
                    raise UserError(f"--lora {lora}: none of its weights fit {model} (a LoRA of another model family?)")
                pipe.fuse_lora(lora_scale=lora_scale)
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # an SDXL LoRA given to SD 1.5, no weights file
            problem = lora_problem(lora, model, err)
            if problem is None:
                raise
            raise UserError(problem) from err
    pipe.to(device)
    if xformers:
        enable_xformers(pipe, device)
    if compile_denoiser:
        setattr(pipe, family.denoiser, torch.compile(getattr(pipe, family.denoiser)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded_posterior_draws(vae, seeds: Sequence[int]) -> AbstractContextManager:
    """A pipeline's own draws from the VAE's posterior (SD3's ControlNet pipeline samples its control image's latents
    from torch's global RNG, `generator` aside: two runs of one seed differed) from one generator per image, seeded by
    `seeds`, in the pipeline's batch order (a guidance batch repeats the images): each image a function of its seed."""
    encode = vae.encode

    def encode_seeded(x: torch.Tensor, *args, **kwargs):
        encoded = encode(x, *args, **kwargs)
        posterior = encoded[0] if isinstance(encoded, tuple) else encoded.latent_dist
        draw = posterior.sample
        if len(x) % len(seeds) == 0:
            generators = [torch.Generator().manual_seed(s) for s in seeds] * (len(x) // len(seeds))
            posterior.sample = lambda generator=None: draw(generator if generator is not None else generators)
        return encoded

    return patch.object(vae, "encode", encode_seeded)  # the class's method again after the block


def generate_batch(pipe, batch: list[Item], seed: int, settings: dict, conditioning: list[Image.Image] | None = None):
    """Images for one batch; image i uses a generator seeded by (seed, key_i) only (and another of them for any draw
    the pipeline makes from the VAE's posterior: `seeded_posterior_draws`)."""
    generators = [torch.Generator().manual_seed(derive_seed(seed, it.key)) for it in batch]
    from sketch2real.family import family_of_pipeline, spell_out_tokens

    family = family_of_pipeline(pipe).with_max_sequence_length(settings.get("max_sequence_length")).with_own_images(
        settings.get("own_images", False))
    extra = {**family.generation_kwargs(), **({family.control_image_argument: conditioning} if conditioning is not None else {})}
    negative = settings.get("negative_prompt") or None
    if negative:
        import inspect

        if "negative_prompt" not in inspect.signature(pipe.__call__).parameters:
            raise UserError(f"--negative_prompt: {type(pipe).__name__} takes no negative prompt")
        extra["negative_prompt"] = [negative] * len(batch)
    with seeded_posterior_draws(pipe.vae, [derive_seed(seed, it.key, "posterior") for it in batch]):
        return pipe(
            prompt=[spell_out_tokens(pipe, it.prompt) for it in batch],
            height=settings["height"], width=settings["width"], num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"], generator=generators, **extra,
        ).images


def write_image(output_dir: Path, key: str, image: Image.Image) -> None:
    with atomic_path(image_path(output_dir, key)) as tmp:
        image.save(tmp, format="PNG")


def _readable(read: Callable[[Any], T], what: Any) -> T | None:
    """`read(what)`, or None (an empty mosaic cell) for a corrupt image, counted in `corrupt_samples`."""
    try:
        return read(what)
    except CorruptSample as err:
        corrupt_samples.record(err, "left out of the mosaic")
        return None


def write_mosaics(output_dir: Path, rows: list[dict], shard_dir: str = "", split: str = "test", cell: int = 128,
                  max_rows: int = 8) -> list[Path]:
    """mosaics/<category>.png (sketch | generated | photo per row) and mosaics/overview.png (a row per category)."""
    from sketch2real.mosaic import image_grid

    samples, position = None, {}
    if shard_dir:
        from sketch2real.shards import ShardSamples

        samples = ShardSamples(shard_dir, split, fields=("sketch", "photo"), as_tensor=False)
        position = {ref.key: i for i, ref in enumerate(samples.refs)}
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(row.get("category") or "prompts", []).append(row)
    written = []
    overview_rows, labels = [], []
    for category, cat_rows in sorted(by_category.items()):
        grid_rows = []
        for row in cat_rows[:max_rows]:
            pair = _readable(samples.read, position[row["sample_key"]]) if samples and row.get("sample_key") in position else None
            grid_rows.append([pair["sketch"] if pair else None, _readable(open_image, image_path(output_dir, row["key"])),
                              pair["photo"] if pair else None])
        out = key_path(output_dir / "mosaics", category.replace("/", "_"), ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            image_grid(grid_rows, cell).save(tmp, format="PNG")
        written.append(out)
        overview_rows.append([_readable(open_image, image_path(output_dir, r["key"])) for r in cat_rows[:max_rows]])
        labels.append(category)
    if overview_rows:
        out = output_dir / "mosaics" / "overview.png"
        with atomic_path(out) as tmp:
            image_grid(overview_rows, cell, labels=labels, label_width=96).save(tmp, format="PNG")
        written.append(out)
    return written


@dataclass(kw_only=True, frozen=True)
class GenerateOptions:
    """Generate images for every item (caption, template x split sample, or prompt), resumably and data-parallel."""

    pretrained_model_name_or_path: str = option("", help="base model or a DreamBooth output (a pipeline, or LoRA weights on their base): hub id or folder (required)")
    revision: str | None = option(None, help="model revision on the hub")
    output_dir: str = option("", help="images/, index.jsonl and mosaics/ go here (required)", affects="runtime")
    ddp_timeout: int = option(7200, help="seconds a process waits for the others (e.g. behind rank 0's final merge) "
                              "before the job fails", min=1, affects="runtime")
    textual_inversion: list[str] = option([], help="learned_embeds.safetensors file(s) to load")
    lora: str = option("", help="folder or file of LoRA weights (pytorch_lora_weights.safetensors)")
    lora_scale: float = option(1.0, help="LoRA strength (0: off)", min=0)
    controlnet: str = option("", help="a trained ControlNet folder: each item is conditioned on its sketch")
    pretrained_vae_model_name_or_path: str = option(
        "", help="a VAE to draw with in place of the model's (default: the one the trained weights' run used, from its "
        "run_config.json, e.g. SDXL's fp16-fix)")
    captions: str = option("", help="captions JSONL from infer/caption.py (one image per row)")
    prompt_ids: list[str] = option([], help="only these prompt ids of --captions", affects="selection")
    prompt_template: str = option("", help="template over the samples of --split: {category}, {key}, {caption}")
    prompts: list[str] = option([], help="plain prompts, or .txt files of them (a prompt a line)")
    shard_dir: str = option("", help="shards (for --prompt_template items, mosaics and --controlnet sketches)")
    split: str = option("test", help="split whose samples the template covers")
    categories: list[str] = option([], help="only these categories", affects="selection")
    max_per_category: int = option(0, help="at most this many samples per category (0: all)", min=0, affects="selection")
    num_images_per_prompt: int = option(1, help="images per item", min=1)
    negative_prompt: str = option("", help="negative prompt")
    scheduler: str = option("", help="sampling scheduler ('': the model's own; flow-matching families: euler only)",
                            choices=("", *NOISE_SAMPLERS))
    num_inference_steps: int = option(50, help="denoising steps", min=1)
    guidance_scale: float | None = option(None, help="guidance scale (classifier-free, <= 1: none; FLUX.1 [dev]: the "
                                          "embedded guidance); default: the family's (SD, SDXL 7.5; SD3 7.0; FLUX.1 3.5; FLUX.2 [klein] 4.0)",
                                          min=0)
    height: int | None = option(None, help="image height in pixels; default: the model's own, as its diffusers pipeline "
                                "has it (SD 1.5 512, SDXL/SD3/FLUX 1024); SD3 and FLUX take a multiple of 16", min=8,
                                multiple_of=8)
    width: int | None = option(None, help="image width in pixels; default: the model's own (SD3, FLUX: a multiple of "
                               "16)", min=8, multiple_of=8)
    batch_size: int = option(8, help="images per batch per process", min=1, affects="runtime")
    seed: int = option(0, help="global seed: each image's seed derives from it and the item's key only", min=0)
    mixed_precision: str | None = option(None, help=PRECISION_HELP, choices=("no", "fp16", "bf16"))  # bf16 moves pixels by levels
    safety_checker: bool = option(False, help="run the safety checker (off by default: it blackens sketches)")
    enable_xformers_memory_efficient_attention: bool = option(False, help="xformers attention (CUDA only)", affects="runtime")
    torch_compile: bool = option(False, help="torch.compile the denoiser (UNet or transformer)", affects="runtime")
    mosaic_rows: int = option(8, help="rows per category mosaic", min=1, affects="runtime")
    max_sequence_length: int | None = option(None, help="SD3, FLUX.1, FLUX.2 [klein]: prompt tokens of the T5/Qwen encoder "
                                             "(diffusers' pipelines' argument); default: the length the trained model, "
                                             "LoRA, ControlNet or embeddings were trained with (their run_config.json), "
                                             "else diffusers' training scripts' (SD3 77, FLUX 512)", min=1, max=512)

    def check(self) -> None:
        """One-line errors for missing values (ranges and choices are checked by `parse_options`)."""
        if not self.pretrained_model_name_or_path or not self.output_dir:
            raise UserError("--pretrained_model_name_or_path and --output_dir are required")
        check_output_dir(self.output_dir, refuse_training_runs=True)
        object.__setattr__(self, "mixed_precision", requested_precision(self.mixed_precision))  # recorded as used (frozen)



def check_tokens_used(items: list[Item], textual_inversion: Sequence[str]) -> None:
    """Each --textual_inversion file's token appears in some prompt: a prompt naming another token (a pipeline's
    `<sketch>` beside a run's `TOKEN='<pencil>'`) drew the base model's images, scored as the method's. Files whose
    token cannot be read from them (not safetensors) are left to the loader."""
    from sketch2real.family import embedding_file

    for file in textual_inversion:
        try:
            token = embedding_file(file)[1]
        except Exception:  # missing (the loader says so in one line) or another format
            continue
        if token and not any(token in it.prompt for it in items):
            raise UserError(f"no prompt uses the token of --textual_inversion {file} ({token}): "
                            f"e.g. {items[0].prompt!r}; name it in the prompt (template) or drop the embedding")


def build_items(opts: GenerateOptions) -> list[Item]:
    """The items the options ask for (each image's prompt, key, category and sample), repeated per image."""
    sources = [bool(opts.captions), bool(opts.prompt_template and not opts.captions), bool(opts.prompts)]
    if sum(sources) != 1:
        raise UserError("give exactly one of --captions, --prompt_template (with --shard_dir) or --prompts")
    from sketch2real.shards import sample_refs

    if opts.controlnet and not (opts.shard_dir and (opts.captions or opts.prompt_template)):
        raise UserError("--controlnet conditions each image on its sketch: use --prompt_template or --captions with --shard_dir")
    if opts.captions:
        items = items_from_captions(opts.captions, opts.prompt_ids, opts.prompt_template or "{caption}")
        if opts.categories:
            items = [it for it in items if it.category in set(opts.categories)]
            if not items:
                raise UserError(f"no captions in {opts.captions} of --categories {' '.join(opts.categories)}")
    elif opts.prompt_template:
        if not opts.shard_dir:
            raise UserError("--prompt_template needs --shard_dir")
        items = items_from_template(opts.prompt_template, opts.shard_dir, opts.split, opts.categories or None)
        if not items:  # nothing to draw: an empty metrics.json and exit 0 read as a finished job
            raise UserError(f"split {opts.split!r} of {opts.shard_dir} has no samples to draw (--split)")
    else:
        items = items_from_prompts(opts.prompts)
    of_samples = bool(items) and bool(items[0].sample_key)  # not free prompts
    in_split = [ref.key for ref in sample_refs(opts.shard_dir, opts.split)] if opts.shard_dir and of_samples else None
    if opts.controlnet and of_samples:  # each sketch is read from the split: all there, before any model loads
        missing = sorted({it.sample_key for it in items} - set(in_split))
        if missing:
            raise UserError(f"{len(missing)} captioned sketches are not in split {opts.split!r} of {opts.shard_dir} (e.g. "
                            f"{missing[0]}): captions of another split? (--split)")
    if opts.max_per_category and of_samples:
        items = first_samples_per_category(items, opts.max_per_category, in_split)
    check_tokens_used(items, opts.textual_inversion)
    return expand(items, opts.num_images_per_prompt)
