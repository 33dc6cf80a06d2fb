"""Each training sample's prompt: its caption (`infer/caption.py`'s JSONL), else a template over its category."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sketch2real.cli import UserError
from sketch2real.io import read_jsonl
from sketch2real.sketchy import category_words


def check_prompt_template(template: str, flag: str) -> None:
    """One line for a template that formats with something other than `{category}` (a stray brace, `{cat}`)."""
    try:
        template.format(category="x")
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"{flag} {template!r}: only {{category}} can be filled in ({err!r})") from err


def check_captions_file(path: str) -> None:
    if path and not Path(path).is_file():
        raise UserError(f"captions file not found: {path}")


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
        for row in read_jsonl(captions) if captions else []:
            if prompt_id and str(row["prompt_id"]) != prompt_id:
                continue
            by_key.setdefault(row["key"], row["caption"])
        return cls(template, by_key)

    def __call__(self, key: str, category: str) -> str:
        return self.captions.get(key) or self.template.format(category=category_words(category))

    @property
    def per_category(self) -> bool:
        """Whether the prompts are one per category (no captions): few enough to encode once and keep."""
        return not self.captions
