"""Captioning sketches with BLIP-2 or LLaVA: the study's prompt library, batched data-parallel
generation with resumable output, and a quality report (category hit rate, length, truncation)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sketch2real.cli import PRECISION_HELP, UserError, as_dict, check_output_dir, option, options_affecting
from sketch2real.io import check_same_settings, merge_parts, read_saved_options, read_with_parts
from sketch2real.models import requested_precision

# What readers of a captions file (generation's --captions, training's --captions) need of each row.
CAPTION_FIELDS = ("key", "prompt_id", "caption")
CAPTION_TEXT = ("key", "caption")  # strings (a hand-edited null caption crashed the reader)

# The ten prompts of the original study (../shared/seed/STUDY-NOTES.md), with its ids.
PROMPTS: dict[str, str] = {
    "1": "What is drawn in this art sketch?",
    "2": "What is drawn in this art sketch ? And what is the view point of this subject ?",
    "3": "What is drawn in this art sketch ? And what is the view point of this subject ? Is it in a particular pose ?",
    "4": "What is drawn in this art sketch ? What are the specific features of this subject (pose, where is it viewed "
         "from, sub-category, ...) ?",
    "5": "Provide a detailed description of the viewpoint and pose depicted in this sketch, including any unique angles "
         "or perspectives.",
    "6": "What is drawn in this art sketch ? Provide a detailed description of the viewpoint and pose depicted in this "
         "sketch, including any unique angles or perspectives.",
    "7": "What is drawn in this art sketch ? Describe the main features and style of this sketch, including viewpoint, "
         "pose, and any notable characteristics.",
    "8": "Offer a narrative interpretation of this sketch, considering its context, mood, and potential symbolic meanings "
         "beyond simple object recognition.",
    "9": "Compare and contrast this sketch with other works in the same category, highlighting unique stylistic choices, "
         "thematic elements, or narrative approaches.",
    "10": "Is there a particular style effect in this art sketch ?",
}
BEST = ["8", "5", "4"]  # the study's three best LLaVA prompts by category accuracy (0.61, 0.59, 0.57)

TEMPLATES = {"blip-2": "Question: {prompt} Answer:", "llava": "USER: <image>\n{prompt}\nASSISTANT:"}

# Words a caption may use for a Sketchy category besides its own name.
SYNONYMS: dict[str, list[str]] = {
    "airplane": ["plane", "aeroplane", "jet", "aircraft", "airliner"],
    "alarm_clock": ["clock"],
    "ape": ["gorilla", "chimpanzee", "monkey", "orangutan"],
    "axe": ["ax", "hatchet"],
    "car_(sedan)": ["car", "sedan", "automobile"],
    "cat": ["kitten", "kitty"],
    "crocodilian": ["crocodile", "alligator"],
    "dog": ["puppy"],
    "eyeglasses": ["glasses", "spectacles"],
    "hermit_crab": ["crab"],
    "hot-air_balloon": ["balloon"],
    "hotdog": ["hot dog", "sausage"],
    "jack-o-lantern": ["pumpkin", "jack o lantern"],
    "pickup_truck": ["pickup", "truck"],
    "rabbit": ["bunny", "hare"],
    "ray": ["stingray", "manta"],
    "sea_turtle": ["turtle"],
    "seagull": ["gull"],
    "songbird": ["bird", "sparrow", "finch"],
    "teddy_bear": ["teddy", "bear"],
    "wading_bird": ["heron", "crane", "stork", "egret", "flamingo"],
    "wine_bottle": ["bottle"],
}


def resolve_prompts(choice: Sequence[str]) -> dict[str, str]:
    """`best`, `all`, prompt ids, or free text (given the id `custom-N`) -> {id: prompt}."""
    prompts: dict[str, str] = {}
    for n, entry in enumerate(choice or ["best"]):
        ids = [i for i in re.split(r"[,\s]+", entry.strip()) if i]
        if entry.strip().lower() == "best":
            prompts.update({i: PROMPTS[i] for i in BEST})
        elif entry.strip().lower() == "all":
            prompts.update(PROMPTS)
        elif ids and all(i.isdigit() for i in ids):  # "4,5,8" and "4 5 8" (one quoted argument) are ids too
            for i in ids:
                if i not in PROMPTS:
                    raise UserError.on_every_rank(f"unknown prompt id {i}; the library has ids 1-{len(PROMPTS)} (or use "
                                                  "best, all, or a prompt's words)")
                prompts[i] = PROMPTS[i]
        elif len(ids) < 2:  # "Best" or "bset" was captioned with that word as the prompt
            raise UserError.on_every_rank(f"--prompts {entry!r}: not best, all or a prompt id (1-{len(PROMPTS)}); a prompt "
                                          "of your own is a sentence of several words")
        else:
            prompts[f"custom-{n}"] = entry
    return prompts


def normalise(text: str) -> str:
    """Lower case, hyphens/underscores/punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower().replace("-", " ").replace("_", " ")).split())


def category_names(category: str) -> list[str]:
    """The category's own name (with and without its parenthesised qualifier) and its synonyms, normalised."""
    names = {normalise(category), normalise(re.sub(r"\(.*?\)", "", category))}
    names.update(normalise(s) for s in SYNONYMS.get(category, []))
    return sorted(n for n in names if n)


def hits_category(caption: str, category: str) -> bool:
    """Does the caption name the category (any name or synonym, as whole words, singular or plural)?"""
    text = f" {normalise(caption)} "
    return any(re.search(rf" {re.escape(name)}(s|es)? ", text) for name in category_names(category))


def quality_report(rows: list[dict]) -> dict[str, dict]:
    """Per prompt id: samples, category hit rate, mean words and characters, truncation rate."""
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_prompt[str(row["prompt_id"])].append(row)
    report = {}
    for prompt_id, group in sorted(by_prompt.items()):
        n, named = len(group), [r for r in group if r["category"]]  # a hit is only asked of images with a category
        report[prompt_id] = {
            "prompt": group[0]["prompt"],
            "samples": n,
            "hit_rate": sum(hits_category(r["caption"], r["category"]) for r in named) / len(named) if named else None,
            "mean_words": sum(len(r["caption"].split()) for r in group) / n,
            "mean_chars": sum(len(r["caption"]) for r in group) / n,
            "truncation_rate": sum(bool(r.get("truncated")) for r in group) / n,
        }
    return report


def format_quality(report: dict[str, dict]) -> str:
    lines = ["| prompt id | samples | category hit rate | mean words | mean chars | truncated | prompt |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for prompt_id, r in report.items():
        hit = "n/a" if r["hit_rate"] is None else f"{r['hit_rate']:.2f}"  # no image with a category (a flat folder)
        lines.append(f"| {prompt_id} | {r['samples']} | {hit} | {r['mean_words']:.1f} | {r['mean_chars']:.0f} | "
                     f"{r['truncation_rate']:.2f} | {r['prompt'][:60]} |")
    return "\n".join(lines) + "\n"


@dataclass
class Captioner:
    """A loaded BLIP-2 or LLaVA model with its processor and prompt template."""

    model: object
    processor: object
    family: str
    name: str

    def generate(self, images: list, prompts: list[str], max_new_tokens: int, num_beams: int = 1) -> tuple[list[str], list[bool]]:
        """Captions for (image_i, prompt_i) pairs in one batched call, and whether each hit max_new_tokens."""
        texts = [TEMPLATES[self.family].format(prompt=p) for p in prompts]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        eos = self.processor.tokenizer.eos_token_id
        pad = self.processor.tokenizer.pad_token_id
        lengths = [int(((row != pad) & (row != eos)).sum()) for row in new_tokens]
        finished = [bool((row == eos).any()) for row in new_tokens]
        captions = [c.strip() for c in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        truncated = [not done and n >= max_new_tokens for n, done in zip(lengths, finished)]
        return captions, truncated


def load_captioner(name_or_path: str, device: torch.device, dtype: torch.dtype, load_in_8bit: bool = False,
                   load_in_4bit: bool = False, trust_remote_code: bool = False) -> Captioner:
    """BLIP-2 or LLaVA from a hub id or folder; 8/4-bit through bitsandbytes on CUDA."""
    from transformers import AutoConfig, AutoProcessor, Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    from sketch2real.models import check_model_path, load

    check_model_path(name_or_path, "captioning model")
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read a model config at {name_or_path}: {str(err).splitlines()[0]}") from err
    family = {"blip-2": "blip-2", "llava": "llava"}.get(config.model_type)
    if family is None:
        raise UserError(f"model family {config.model_type!r} not supported: use a BLIP-2 or LLaVA checkpoint")
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if load_in_8bit or load_in_4bit:
        if device.type != "cuda":
            raise UserError("--load_in_8bit/--load_in_4bit need a CUDA device (bitsandbytes quantized inference)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                                                           bnb_4bit_compute_dtype=dtype)  # --mixed_precision's
        kwargs["device_map"] = {"": device}
    cls = Blip2ForConditionalGeneration if family == "blip-2" else LlavaForConditionalGeneration
    model = load(cls, name_or_path, "captioning model", **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    processor = load(AutoProcessor, name_or_path, "processor", trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"  # generation continues after the prompt
    return Captioner(model, processor, family, name_or_path)


def finished_pairs(output_dir: Path) -> set[tuple[str, str]]:
    return {(r["key"], str(r["prompt_id"])) for r in read_with_parts(output_dir, "captions")}


CONFIG = "caption_config.json"
def caption_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a captioning job's options (`as_dict`) that determines its captions (model, prompts, length, beams,
    the images): those that affect the result (`option(affects=...)`: not how the job runs, nor which samples it
    draws), an option the job did not save counting as its default."""
    defaults = as_dict(CaptionOptions())
    result = options_affecting(CaptionOptions, "result")
    settings = {k: options.get(k, v) for k, v in defaults.items() if k in result}
    settings["prompts"] = resolve_prompts(settings["prompts"])  # `best` and `4 5 8` are the same prompts
    if options.get(SHARDS_DATA):  # the shards by what they hold (their index): copied elsewhere the same, rebuilt not
        settings["shard_dir"] = options[SHARDS_DATA]
    if options.get(MODEL_DATA):  # the captioner by what its files hold too: replaced in place, another
        settings[MODEL_DATA] = options[MODEL_DATA]
    return settings


SHARDS_DATA = "shards_data"  # caption_config.json's key of the shard index's hash (beside the options)
MODEL_DATA = "model_content"  # and of a local captioner's weight files (`models.local_model_identity`)


def resumable_pairs(output_dir: Path, options: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The (key, prompt id) pairs already captioned in `output_dir`, provided they were captioned under these
    settings: a folder whose caption_config.json has other `caption_settings` is refused in one line (a resume would
    keep another model's captions beside a config naming this one). No config (an older version's folder): resumed;
    one saved before the shards were known by their index: compared by path."""
    done = finished_pairs(output_dir) if output_dir.is_dir() else set()
    if done:
        saved = read_saved_options(output_dir / CONFIG)
        for recorded in (SHARDS_DATA, MODEL_DATA):  # a config saved before it was recorded: compared by path
            if saved is not None and recorded not in saved:
                options = {k: v for k, v in options.items() if k != recorded}
        check_same_settings(output_dir, CONFIG, options, caption_settings, "captions")
    return done


def merge_captions(output_dir: Path) -> list[dict]:
    """Fold the ranks' part files into captions.jsonl (sorted by key and prompt, one row per pair)."""
    return merge_parts(output_dir, "captions", key=lambda r: (r["key"], str(r["prompt_id"])))


@dataclass(kw_only=True, frozen=True)
class CaptionOptions:
    """Caption every sketch of a split (or an image folder) with several prompts; resumable and data-parallel."""

    model_name_or_path: str = option("", help="BLIP-2 or LLaVA checkpoint: hub id or folder (required)")
    output_dir: str = option("", help="captions.jsonl and quality.{json,md} go here (required)", affects="runtime")
    ddp_timeout: int = option(7200, help="seconds a process waits for the others (e.g. behind rank 0's final merge) "
                              "before the job fails", min=1, affects="runtime")
    shard_dir: str = option("", help="shards to caption")
    split: str = option("test", help="split of --shard_dir")
    categories: list[str] = option([], help="only these categories", affects="selection")
    image_field: str = option("sketch", help="sketch or photo", choices=("sketch", "photo"), noun="image field")
    image_dir: str = option("", help="a folder of images instead of shards (category = subfolder)")
    prompts: list[str] = option(["best"], help="'best' (study's top 3), 'all', prompt ids 1-10, or free text")
    batch_size: int = option(8, help="images per batch per process (each with every prompt)", min=1, affects="runtime")
    max_new_tokens: int = option(100, help="caption length limit in tokens", min=1)
    num_beams: int = option(1, help="beam search width (1: greedy, as in the study)", min=1)
    mixed_precision: str | None = option(None, help=PRECISION_HELP, choices=("no", "fp16", "bf16"))  # bf16 changes words
    load_in_8bit: bool = option(False, help="8-bit weights (bitsandbytes, CUDA)")
    load_in_4bit: bool = option(False, help="4-bit weights (bitsandbytes, CUDA)")
    trust_remote_code: bool = option(False, help="allow a checkpoint's own code to run", affects="runtime")
    num_workers: int = option(2, help="decoding workers per process (0: in the main process)", min=0, affects="runtime")

    def check(self) -> None:
        """One-line errors for missing or inconsistent values (ranges and choices are checked by `parse_options`)."""
        if not self.model_name_or_path or not self.output_dir:
            raise UserError("--model_name_or_path and --output_dir are required")
        if bool(self.shard_dir) == bool(self.image_dir):
            raise UserError("give exactly one of --shard_dir or --image_dir")
        if self.load_in_8bit and self.load_in_4bit:
            raise UserError("--load_in_8bit and --load_in_4bit: give one")
        check_output_dir(self.output_dir, refuse_training_runs=True)
        object.__setattr__(self, "mixed_precision", requested_precision(self.mixed_precision))  # recorded as used (frozen)
