"""The Sketchy release on disk: categories, photos, sketches and the info/ lists.

Layout (as downloaded and extracted: `rendered_256x256.7z` unpacks to `256x256/` and `README.txt`, the info archive
to `info/`):

    ROOT/256x256/photo/tx_000000000000/<category>/n<synset>_<id>.jpg
    ROOT/256x256/sketch/tx_000000000000/<category>/<photo id>-<k>.png
    ROOT/info/stats.csv, testset.txt, invalid-{error,ambiguous,pose,context}.txt

`256x256/` may also sit in a `rendered_256x256/` folder (the archive extracted into a folder of its name), or be ROOT
itself (then info/ beside it, or --info_dir). Photos come in 2 renderings and sketches in 6 (`tx_*` folders); only
the un-augmented pair (tx_000000000000 of both) is pixel-aligned.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from sketch2real.cli import UserError

RENDERED = Path("256x256")  # as rendered_256x256.7z extracts (what the synthetic release writes)
RENDERED_PLACES = (RENDERED, Path("rendered_256x256") / RENDERED, Path("."))  # where a release's 256x256/ is looked for
DEFAULT_AUGMENTATION = "tx_000000000000"  # the un-augmented photo/sketch pairs
# the release's renderings (its README.txt): photos non-uniformly scaled to 256x256 (tx_000000000000) or their bounding
# box +10% (tx_000100000000); sketches as their photo's first rendering (tx_000000000000, the one pixel-aligned pair),
# or centred and scaled to 78% (tx_000100000000), or centred on the photo's bounding box, scaled four ways
PHOTO_AUGMENTATIONS = ("tx_000000000000", "tx_000100000000")
SKETCH_AUGMENTATIONS = ("tx_000000000000", "tx_000100000000", "tx_000000000010", "tx_000000000110", "tx_000000001010",
                        "tx_000000001110")
INVALID_KINDS = ("error", "ambiguous", "pose", "context")
STATS_COLUMNS = [
    "CategoryID", "Category", "ImageNetID", "SketchID", "Difficulty", "Stroke_Count",
    "Error?", "Context?", "Ambiguous?", "WrongPose?",
]

# The 125 categories of the Sketchy database, as its folders name them.
CATEGORIES = (
    "airplane alarm_clock ant ape apple armor axe banana bat bear bee beetle bell bench bicycle blimp "
    "bread butterfly cabin camel candle cannon car_(sedan) castle cat chair chicken church couch cow crab "
    "crocodilian cup deer dog dolphin door duck elephant eyeglasses fan fish flower frog geyser giraffe "
    "guitar hamburger hammer harp hat hedgehog helicopter hermit_crab horse hot-air_balloon hotdog "
    "hourglass jack-o-lantern jellyfish kangaroo knife lion lizard lobster motorcycle mouse mushroom owl "
    "parrot pear penguin piano pickup_truck pig pineapple pistol pizza pretzel rabbit raccoon racket ray "
    "rhinoceros rifle rocket sailboat saw saxophone scissors scorpion sea_turtle seagull seal shark sheep "
    "shoe skyscraper snail snake songbird spider spoon squirrel starfish strawberry swan sword table tank "
    "teapot teddy_bear tiger tree trumpet turtle umbrella violin volcano wading_bird wheelchair windmill "
    "window wine_bottle zebra"
).split()

_SKETCH_NAME = re.compile(r"^(?P<photo>.+)-(?P<k>\d+)$")


def photo_key(sample_key: str) -> str:
    """The photo a sample (sketch/photo pair) key belongs to: 'cat/n02121808_1234-2' -> 'cat/n02121808_1234'."""
    return sample_key.rsplit("-", 1)[0]


def sketch_condition(sketch):
    """A sketch as a ControlNet conditioning image: strokes white on black, in [0, 1].

    The convention of the scribble and line-art ControlNets (lllyasviel's), so a hub ControlNet can be a
    starting point; and the one that trains: a white page is a constant input whose variation the
    conditioning embedding barely sees, where sparse bright strokes drive it (with black-on-white a 600-step
    ControlNet on the tiny base ignored its sketch: pairing gain 0.015 [-0.020, 0.050]; inverted, 300 steps
    give 0.078 [0.041, 0.120]). Takes a PIL image, or a tensor in [-1, 1] as the shards decode it.
    """
    from PIL import Image, ImageOps

    if isinstance(sketch, Image.Image):
        return ImageOps.invert(sketch.convert("RGB"))
    return (1 - sketch) / 2


def category_words(category: str) -> str:
    """A folder name as words for prompts: `car_(sedan)` -> `car (sedan)`, `hot-air_balloon` -> `hot-air balloon`."""
    return category.replace("_", " ")


def check_template(template: str, fields: Collection[str], flag: str = "--prompt_template") -> None:
    """One line for a prompt template that fills in something other than `fields` (`{category}`, ...) as they are:
    a stray brace, an unknown name (`{cat}`), an attribute (`{category.upper}` formatted as "<built-in method ...>"),
    an index, a conversion or a format spec."""
    import string

    allowed = ", ".join("{" + f + "}" for f in sorted(fields))
    try:
        parts = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                 if name is not None]
    except ValueError as err:
        raise UserError(f"{flag} {template!r}: {err} (a literal brace is written {{{{ or }}}})") from err
    for name, spec, conversion in parts:
        if name not in fields or spec or conversion:
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UserError(f"{flag} {template!r}: {field} cannot be filled in; it can hold {allowed}")


def with_article(words: str) -> str:
    """`words` after their indefinite article, by the first letter: `an airplane`, `a cat`."""
    return f"{'an' if words[:1].lower() in 'aeiou' else 'a'} {words}"


@dataclass(frozen=True)
class SketchRecord:
    """One sketch of the release and the photo it was drawn from."""

    category: str
    photo_id: str  # n<synset>_<id>
    sketch_index: int  # k in <photo id>-<k>.png
    sketch_path: str  # relative to the release root
    photo_path: str  # relative to the release root

    @property
    def sketch_id(self) -> str:
        return f"{self.photo_id}-{self.sketch_index}"

    @property
    def key(self) -> str:
        """A unique, dot-free sample key (webdataset splits member names at the first dot)."""
        return f"{self.category}/{self.sketch_id}".replace(".", "_")


class SketchyRelease:
    """Read access to an extracted Sketchy release rooted at `root`."""

    def __init__(self, root: str | os.PathLike, photo_augmentation: str = DEFAULT_AUGMENTATION,
                 sketch_augmentation: str = DEFAULT_AUGMENTATION, info_dir: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"Sketchy root not found: {self.root}")
        rendered = next((self.root / place for place in RENDERED_PLACES
                         if (self.root / place / "photo").is_dir() and (self.root / place / "sketch").is_dir()), None)
        if rendered is None:
            raise UserError(f"{self.root} is not a Sketchy release: no {RENDERED}/photo/ and {RENDERED}/sketch/ in it, nor "
                            f"in rendered_256x256/ (extract rendered_256x256.7z into it: it holds {RENDERED}/)")
        self.photo_dir = rendered / "photo" / photo_augmentation
        self.sketch_dir = rendered / "sketch" / sketch_augmentation
        info_beside = rendered == self.root and not (self.root / "info").is_dir()  # ROOT is 256x256/ itself
        self.info_dir = Path(info_dir) if info_dir else (self.root.parent if info_beside else self.root) / "info"
        if info_dir and self.info_dir.is_file():  # "info/stats.csv": the folder holding it is meant
            raise UserError(f"--info_dir {info_dir} is a file: give the folder that holds it ({self.info_dir.parent})")
        for needed in (self.photo_dir, self.sketch_dir, self.info_dir):
            if not needed.is_dir():
                found = sorted(p.name for p in needed.parent.iterdir() if p.is_dir()) if needed.parent.is_dir() else []
                raise UserError(f"{self.root} is not a Sketchy release: missing {needed}" + (
                    f" (there: {', '.join(found)})" if found else " (give --info_dir)" if needed == self.info_dir else ""))

    @cached_property
    def categories(self) -> list[str]:
        """Category folder names found under sketch/, sorted."""
        found = sorted(p.name for p in self.sketch_dir.iterdir() if p.is_dir() and not p.name.startswith("."))  # .ipynb_checkpoints
        if not found:
            raise UserError(f"no category folders in {self.sketch_dir}")
        return found

    def photo_files(self, category: str) -> dict[str, str]:
        """Photo id (file stem) -> file name of one category's photos (.jpg, also .JPG/.jpeg as a re-saved copy has)."""
        folder = self.photo_dir / category
        files = {p.stem: p.name for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg")
                 and not p.name.startswith(".")} if folder.is_dir() else {}  # macOS's ._* twins, as for sketches
        return files

    def photo_categories(self) -> list[str]:
        """Category folder names found under photo/, sorted (hidden folders left out, as under sketch/)."""
        return sorted(p.name for p in self.photo_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def sketch_files(self, category: str) -> list[Path]:
        """The .png files (any case of the extension: `.PNG` from a re-saved copy; hidden ones, such as macOS's `._*`,
        aside) of one category's sketch folder, sorted."""
        folder = self.sketch_dir / category
        return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")
                      and p.is_file()) if folder.is_dir() else []

    def photo_ids(self, category: str) -> list[str]:
        """Sorted photo ids (file stems) of one category; an error if it has none."""
        ids = sorted(self.photo_files(category))
        if not ids:
            raise UserError(f"category {category!r} has no photos in {self.photo_dir / category}")
        return ids

    def sketches(self, categories: list[str] | None = None) -> list[SketchRecord]:
        """Every sketch (of `categories`, default all) whose photo exists, sorted by category, photo and index;
        `sketches_without_photo` counts the others."""
        return [r for r in self._scan[0] if categories is None or r.category in categories]

    def sketches_without_photo(self, categories: list[str] | None = None) -> list[str]:
        """Sketch files (release-relative) named for a photo the release does not have."""
        return [p for c, p in self._scan[1] if categories is None or c in categories]

    def stray_files(self, categories: list[str] | None = None) -> list[str]:
        """Files (release-relative, hidden ones aside) of the sketch folders not named like a sketch,
        `<photo id>-<k>.png`: a copy's duplicate (`x-1 (1).png`), a note, a thumbnail database."""
        return [p for c, p in self._scan[2] if categories is None or c in categories]

    @cached_property
    def _scan(self) -> tuple[list[SketchRecord], list[tuple[str, str]], list[tuple[str, str]]]:
        records, orphans, strays = [], [], []
        for category in self.categories:
            photos = self.photo_files(category)
            sketches = self.sketch_files(category)
            names = {p.name for p in sketches}
            strays += [(category, str(p.relative_to(self.root))) for p in (self.sketch_dir / category).iterdir()
                       if p.name not in names and not p.name.startswith(".") and p.is_file()]
            for path in sketches:
                match = _SKETCH_NAME.match(path.stem)
                if not match:
                    strays.append((category, str(path.relative_to(self.root))))
                    continue
                if match["photo"] not in photos:
                    orphans.append((category, str(path.relative_to(self.root))))
                    continue
                records.append(
                    SketchRecord(
                        category=category,
                        photo_id=match["photo"],
                        sketch_index=int(match["k"]),
                        sketch_path=str(path.relative_to(self.root)),
                        photo_path=str((self.photo_dir / category / photos[match["photo"]]).relative_to(self.root)),
                    )
                )
        records.sort(key=lambda r: (r.category, r.photo_id, r.sketch_index))
        seen: dict[str, SketchRecord] = {}
        for record in records:  # keys replace dots: `a.b-1.png` and `a_b-1.png` would be one sample, used twice
            other = seen.setdefault(record.key, record)
            if other is not record:
                raise UserError(f"{other.sketch_path} and {record.sketch_path} give the same sample key {record.key!r}: "
                                "rename one of them")
        return records, orphans, sorted(strays)

    def testset(self) -> list[tuple[str, str]]:
        """(category, photo id) pairs listed in info/testset.txt (`category/photo.jpg` per line; a category spelt as
        stats.csv spells it, `car (sedan)`, is read as its folder's `car_(sedan)`)."""
        path = self.info_dir / "testset.txt"
        if not path.is_file():
            raise UserError(f"{path} not found: the Sketchy test split is defined by it")
        pairs = []
        for line in path.read_text(encoding="utf-8-sig").splitlines():  # -sig: a BOM (Windows editors) is no part of a name
            line = line.strip()
            if not line:
                continue
            category, _, name = line.replace("\\", "/").rpartition("/")
            pairs.append((category.strip().replace(" ", "_"), Path(name).stem))
        return pairs

    def invalid(self, kind: str) -> set[str]:
        """Sketch ids (`<photo id>-<k>`) flagged in info/invalid-<kind>.txt; empty if the file is absent."""
        if kind not in INVALID_KINDS:
            raise ValueError(f"unknown invalid list {kind!r}")
        path = self.info_dir / f"invalid-{kind}.txt"
        if not path.is_file():
            return set()
        ids = set()
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            line = line.strip()
            if line:
                ids.add(Path(line.replace("\\", "/")).stem)  # tolerate category/ prefixes and extensions
        return ids

    def difficulty(self) -> dict[str, int]:
        """Sketch id -> Difficulty from info/stats.csv (empty if absent)."""
        path = self.info_dir / "stats.csv"
        if not path.is_file():
            return {}
        result = {}
        with open(path, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                try:
                    result[f"{row['ImageNetID']}-{int(row['SketchID'])}"] = int(row["Difficulty"])
                except (KeyError, ValueError):
                    continue
        return result
