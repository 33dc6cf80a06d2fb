"""Each training sample's prompt: its caption (`infer/caption.py`'s JSONL), else a template over its category."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sketch2real.captioning import CAPTION_FIELDS, CAPTION_TEXT
from sketch2real.cli import UserError
from sketch2real.io import read_jsonl
from sketch2real.sketchy import category_words, check_template

logger = logging.getLogger("sketch2real")
ROW_CATEGORIES = 4  # validation mosaic rows of a prompt naming {category}: one per category, this many at most


def check_prompt_template(template: str, flag: str) -> None:
    """One line for a training prompt that fills in something other than `{category}` (`sketchy.check_template`)."""
    check_template(template, {"category"}, flag)


def check_validation_prompts(prompts: list[str], without: str = "") -> None:
    """One line for a --validation_prompt that formats with something other than `{category}`, or that names
    `{category}` where `without` (the flag of images that have no category: `--train_data_dir`...) is given."""
    for prompt in prompts:
        check_prompt_template(prompt, "--validation_prompt")
        if without and "{category}" in prompt:
            raise UserError(f"--validation_prompt {prompt!r}: {{category}} is filled in from the shards' categories; "
                            f"{without} images have none: name what to draw")


def fill_category(prompt: str, category: str) -> str:
    """`prompt` (a checked template) with `{category}` as the category's words (`car_(sedan)` -> "car (sedan)") and
    `{{`/`}}` as the braces they stand for, as training reads the instance prompt (validation drew `a {{sks}}`)."""
    return prompt.format(category=category_words(category))


def with_category(template: str, category: str) -> str:
    """`template` with `{category}` filled in, still a template: its literal braces stay doubled, so a stage's
    DreamBooth, which fills its prompts again, reads `{{sks}}` as `fill_category` does (once formatted, `{sks}` was
    a field: a KeyError at the stage's first validation)."""
    import string

    escape = lambda text: text.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return "".join(escape(literal) + (escape(category_words(category)) if name == "category" else "")
                   for literal, name, _, _ in string.Formatter().parse(template))


def validation_rows(prompts: list[str], categories: list[str], fixed: str | None = None,
                    own: Sequence[str] = ()) -> list[tuple[str, str | None]]:
    """(prompt, category) of each validation mosaic row: a prompt naming `{category}` gives a row per category of the
    run (the first `ROW_CATEGORIES` by name), filled in; another prompt one row, of category `fixed` where it is one of
    `own` (DreamBooth's instance prompt: it draws what it trained on) or names `fixed`'s words, else None (not known:
    `a photo of a dog` beside a cat's stage is no cat)."""
    chosen = sorted(set(categories))[:ROW_CATEGORIES]
    rows: list[tuple[str, str | None]] = []
    for prompt in prompts:
        if "{category}" in prompt:
            rows += [(fill_category(prompt, c), c) for c in chosen]
            continue
        named = fixed is not None and (prompt in own or as_word(category_words(fixed), re.IGNORECASE).search(prompt))
        rows.append((fill_category(prompt, ""), fixed if named else None))
    return rows


def as_word(text: str, flags: int = 0) -> re.Pattern:
    """`text` where it stands as a word of a prompt: not inside another word, whatever its own ends are (`\\b`
    missed `<sks>` and "car (sedan)": no boundary beside `>` or `)` before a space)."""
    return re.compile(rf"(?<!\w){re.escape(text)}(?!\w)", flags)


def check_captions_file(path: str, prompt_id: str = "") -> None:
    if path and not Path(path).is_file():
        raise UserError(f"captions file not found: {path}")
    if prompt_id and not path:
        raise UserError("--caption_prompt_id chooses among --captions' prompts: give --captions")


@dataclass(frozen=True)
class SamplePrompts:
    """A sample's prompt from its key and category: its caption where the captions file has one, else `template`
    with the category's words (`car_(sedan)` -> "car (sedan)")."""

    template: str
    captions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, template: str, captions: str = "", prompt_id: str = "") -> SamplePrompts:
        """`captions`: a JSONL of {key, prompt_id, caption} rows; `prompt_id`: which prompt's captions (default: each
        sample's first)."""
        by_key: dict[str, str] = {}
        rows = read_jsonl(captions, required=CAPTION_FIELDS, text=CAPTION_TEXT) if captions else []
        empty = 0
        for row in rows:
            if prompt_id and str(row["prompt_id"]) != prompt_id:
                continue
            caption = row["caption"].strip()  # as infer/generate.py draws it (Qwen's tokens differ for " a cat ")
            if not caption:  # a captioner's "": the template, said and counted as such (it counted as captioned)
                empty += 1
                continue
            by_key.setdefault(row["key"], caption)
        if empty:
            logger.warning("%d captions in %s are empty: their images train with the template", empty, captions)
        if captions and not by_key:  # a mistyped id trained the template alone, silently
            ids = sorted({str(row.get("prompt_id")) for row in rows})
            raise UserError(f"no captions of --caption_prompt_id {prompt_id} in {captions} (its prompt ids: "
                            f"{', '.join(ids) or 'none'})" if prompt_id else f"no captions in {captions}")
        return cls(template, by_key)

    def check_covers(self, keys: list[str], what: str) -> None:
        """With captions: one line where none of `keys` has one (captions of another split or data set: the
        template alone would train), and how many do in the log."""
        if not self.captions:
            return
        covered = sum(key in self.captions for key in keys)
        if not covered:
            raise UserError(f"none of the {len(keys)} {what} has a caption in --captions (first: {keys[0] if keys else '-'}, "
                            f"theirs: {next(iter(self.captions))}): captions of another split?")
        logger.info("captions for %d of %d %s (the others: the template)", covered, len(keys), what)

    def warn_cut(self, family, tokenizers: list, keys: list[str]) -> None:
        """A warning where the captions of `keys` (the run's samples) are longer than the family's text encoder reads
        (diffusers' pipelines cut them the same way, with a warning per prompt): how many, and what reads more."""
        captions = sorted({self.captions[key] for key in keys if key in self.captions})
        if not captions:
            return
        cut, limit = family.prompts_cut(tokenizers, captions)
        if cut:
            more = ("--max_sequence_length (up to 512) reads more" if family.max_sequence_length is not None
                    else "CLIP reads no more: shorter captions (infer/caption.py --max_new_tokens) keep their ends")
            logger.warning("%d of %d captions are longer than the %d tokens the text encoder reads: their ends are cut; %s",
                           cut, len(captions), limit, more)

    def __call__(self, key: str, category: str) -> str:
        return self.captions.get(key) or self.template.format(category=category_words(category))

    @property
    def per_category(self) -> bool:
        """Whether the prompts are one per category (no captions): few enough to encode once and keep."""
        return not self.captions
