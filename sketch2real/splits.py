"""Photo-level train/val/test splits of a Sketchy release: no sketch of a test photo is ever in train.

The test split is the photos of info/testset.txt; validation is a seeded fraction
of the remaining photos of each category; every sketch follows its photo.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sketch2real.cli import UserError
from sketch2real.io import write_json, write_jsonl
from sketch2real.sketchy import CATEGORIES, INVALID_KINDS, SketchyRelease

logger = logging.getLogger("sketch2real")

SPLITS = ("train", "val", "test")


@dataclass
class SplitResult:
    """Rows per split and the report written beside them."""

    rows: dict[str, list[dict]]
    report: dict = field(default_factory=dict)


def _photo_rng(seed: int, category: str) -> random.Random:
    # Seeded per category, so adding a category never reshuffles the others.
    digest = hashlib.sha256(f"{seed}:{category}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def build_splits(
    release: SketchyRelease,
    val_fraction: float = 0.1,
    seed: int = 0,
    keep_invalid: tuple[str, ...] = (),
    categories: list[str] | None = None,
    strict_testset: bool = False,
) -> SplitResult:
    """Assign every valid sketch of `release` to train, val or test by its photo.

    `keep_invalid` names the invalid lists (error, ambiguous, pose, context) whose
    sketches are kept. Test photos named in testset.txt but absent from the
    release are reported (and are an error with `strict_testset`).
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    unknown_kinds = sorted(set(keep_invalid) - set(INVALID_KINDS))
    if unknown_kinds:
        raise UserError(f"unknown invalid list(s) {unknown_kinds}; choose from {list(INVALID_KINDS)}")
    all_categories = release.categories
    if categories:
        missing = sorted(set(categories) - set(all_categories))
        if missing:
            raise UserError(f"unknown category {missing[0]!r}; the release has: {', '.join(all_categories)}")
    chosen = sorted(categories or all_categories)
    # an empty category folder (no photo, no sketch: a category removed from a copy) is skipped unless asked for by
    # name; one with sketches but no photos stays an error (a copy cut short)
    empty = [] if categories else [c for c in chosen if not release.photo_files(c) and not release.sketch_files(c)]
    chosen = [c for c in chosen if c not in empty]
    if empty:
        logger.warning("skipping %d empty category folder(s): %s", len(empty), ", ".join(empty))
    # A user's own categories are used, but said: a folder made by mistake (`Mystery (New)`) would be one.
    unknown = [c for c in chosen if c not in CATEGORIES]
    if unknown:
        logger.warning("%d category folder(s) not among Sketchy's %d categories, used as categories: %s",
                       len(unknown), len(CATEGORIES), ", ".join(unknown))
    photo_only = [] if categories else sorted(set(release.photo_categories()) - set(all_categories))
    if photo_only:
        logger.warning("%d photo folder(s) with no sketch folder left out: %s", len(photo_only), ", ".join(photo_only))

    photos = {c: release.photo_ids(c) for c in chosen}
    # a test line whose category is spelt otherwise (a hand-edited list) finds its photo by id: unmatched, the photo
    # would have gone to train, a leak; a photo in no folder of the release is absent (and cannot leak)
    photos_of = {category: set(release.photo_files(category)) for category in all_categories}
    home: dict[str, str] = {}
    for category, ids in photos_of.items():
        for photo_id in ids:
            home.setdefault(photo_id, category)
    test_photos: set[tuple[str, str]] = set()
    absent_test = []
    for category, photo_id in release.testset():
        if photo_id in photos_of.get(category, ()):
            found = category
        elif photo_id in home:
            found = home[photo_id]
        elif category in photos_of and category not in photos:
            continue  # a category the user left out: its photos are not looked for
        else:
            absent_test.append(f"{category}/{photo_id}.jpg")
            continue
        if found in photos:  # else a category the user left out
            test_photos.add((found, photo_id))
    if absent_test and strict_testset:
        raise UserError(f"testset.txt names {len(absent_test)} photo(s) absent from the release, e.g. {absent_test[0]}")

    split_of_photo: dict[tuple[str, str], str] = {}
    for category in chosen:
        rest = [p for p in photos[category] if (category, p) not in test_photos]
        rng = _photo_rng(seed, category)
        rng.shuffle(rest)
        n_val = round(len(rest) * val_fraction)
        for i, photo_id in enumerate(rest):
            split_of_photo[(category, photo_id)] = "val" if i < n_val else "train"
        for photo_id in photos[category]:
            if (category, photo_id) in test_photos:
                split_of_photo[(category, photo_id)] = "test"
    # One photo in two category folders (a copy filed twice) would be in two splits, a leak: every copy takes one
    # split, the test one where a copy is a test photo, else its first category's.
    folders_of: dict[str, list[str]] = defaultdict(list)
    for category in chosen:
        for photo_id in photos[category]:
            folders_of[photo_id].append(category)
    shared = {photo_id: folders for photo_id, folders in folders_of.items() if len(folders) > 1}
    for photo_id, folders in shared.items():
        splits = [split_of_photo[(c, photo_id)] for c in folders]
        split = "test" if "test" in splits else splits[0]
        for category in folders:
            split_of_photo[(category, photo_id)] = split
    if shared:
        photo_id, folders = next(iter(shared.items()))
        logger.warning("%d photo id(s) in more than one category folder (e.g. %s in %s): each kept in one split, the "
                       "test split where one copy is a test photo", len(shared), photo_id, " and ".join(folders))

    flags_of: dict[str, list[str]] = defaultdict(list)
    known = {record.sketch_id for record in release.sketches()}
    for kind in INVALID_KINDS:
        listed = release.invalid(kind)
        for sketch_id in listed:
            flags_of[sketch_id].append(kind)
        unknown_ids = sorted(listed - known)
        if unknown_ids:  # another format than `<photo id>-<k>` per line would exclude nothing, silently
            logger.warning("invalid-%s.txt: %d of its %d sketch ids name no sketch of the release (e.g. %r; a line is "
                           "`<photo id>-<k>`): they exclude nothing", kind, len(unknown_ids), len(listed), unknown_ids[0])
    difficulty = release.difficulty()

    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    excluded: Counter = Counter()
    per_category: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for record in release.sketches():
        if record.category not in photos:
            continue
        flags = sorted(flags_of.get(record.sketch_id, []))
        dropping = [f for f in flags if f not in keep_invalid]
        if dropping:
            for f in dropping:
                excluded[f] += 1
            excluded["sketches"] += 1
            continue
        split = split_of_photo[(record.category, record.photo_id)]
        rows[split].append({
            "key": record.key,
            "category": record.category,
            "photo_id": record.photo_id,
            "sketch_index": record.sketch_index,
            "sketch_path": record.sketch_path,
            "photo_path": record.photo_path,
            "flags": flags,
            "difficulty": difficulty.get(record.sketch_id),
            "split": split,
        })
        per_category[split][record.category] += 1

    drawn = {(r.category, r.photo_id) for r in release.sketches(chosen)}
    unsketched = [f"{c}/{p}" for c in chosen for p in photos[c] if (c, p) not in drawn]
    if unsketched:
        logger.warning("%d photo(s) without any sketch (in no split's rows), e.g. %s", len(unsketched), unsketched[0])
    strays = release.stray_files(chosen)
    if strays:
        logger.warning("%d file(s) in the sketch folders not named like a sketch (<photo id>-<k>.png) left out, e.g. %s",
                       len(strays), strays[0])
    orphans = release.sketches_without_photo(chosen)  # a sketch whose photo is missing from the copy
    if orphans:
        excluded["no photo"] += len(orphans)
        excluded["sketches"] += len(orphans)
        logger.warning("%d sketch(es) without their photo left out, e.g. %s", len(orphans), orphans[0])
    report = {
        "seed": seed,
        "val_fraction": val_fraction,
        "keep_invalid": sorted(keep_invalid),
        "categories": chosen,
        "sketches": {s: len(rows[s]) for s in SPLITS},
        "photos": {s: len({(r["category"], r["photo_id"]) for r in rows[s]}) for s in SPLITS},
        "per_category": {s: dict(sorted(per_category[s].items())) for s in SPLITS},
        "excluded": dict(sorted(excluded.items())),
        "testset_absent": sorted(absent_test),
        "empty_categories": empty,
        "unknown_categories": unknown,
        "photo_only_categories": photo_only,
        "photos_without_sketches": len(unsketched),
        "stray_files": len(strays),
        "photos_in_several_categories": len(shared),
    }
    no_val = [c for c in chosen if not any(split_of_photo[(c, p)] == "val" for p in photos[c])]
    if val_fraction > 0 and no_val:  # the trainers' held-out loss and validation read it
        logger.warning("%d of %d categories have no val photo (--val_fraction %g of their non-test photos rounds to "
                       "none): %s", len(no_val), len(chosen), val_fraction, ", ".join(no_val[:8]) +
                       (" ..." if len(no_val) > 8 else ""))
    return SplitResult(rows=rows, report=report)


def write_splits(result: SplitResult, output_dir: str | Path) -> None:
    """Write {train,val,test}.jsonl, report.json and report.md (atomically; byte-identical for equal input)."""
    out = Path(output_dir)
    for split in SPLITS:
        write_jsonl(out / f"{split}.jsonl", result.rows[split])
    write_json(out / "report.json", result.report)
    (out / "report.md").write_text(format_report(result.report))


def format_report(report: dict) -> str:
    """The split report as a markdown table (sketches per split and category)."""
    lines = ["| category | train | val | test |", "|---|---:|---:|---:|"]
    for category in report["categories"]:
        counts = [report["per_category"][s].get(category, 0) for s in SPLITS]
        lines.append(f"| {category} | " + " | ".join(map(str, counts)) + " |")
    lines.append("| **all sketches** | " + " | ".join(str(report["sketches"][s]) for s in SPLITS) + " |")
    lines.append("| **photos** | " + " | ".join(str(report["photos"][s]) for s in SPLITS) + " |")
    excluded = report["excluded"]
    text = "\n".join(lines) + "\n\n"
    text += f"Excluded sketches: {excluded.get('sketches', 0)} " + (
        "(" + ", ".join(f"{k}: {v}" for k, v in excluded.items() if k != "sketches") + ")" if excluded else "") + "\n"
    notes = {"unknown_categories": "category folder(s) not among Sketchy's categories (used)",
             "photo_only_categories": "photo folder(s) with no sketch folder (left out)",
             "photos_without_sketches": "photo(s) without any sketch", "stray_files": "stray file(s) in the sketch folders",
             "photos_in_several_categories": "photo id(s) in more than one category folder (each in one split)"}
    for name, words in notes.items():
        count = report.get(name, 0)
        count = len(count) if isinstance(count, list) else count
        if count:
            text += f"{count} {words}.\n"
    if report["testset_absent"]:
        text += f"testset.txt names {len(report['testset_absent'])} photo(s) absent from the release (skipped).\n"
    return text


def warn_absent(report: dict) -> None:
    if report["testset_absent"]:
        print(f"warning: testset.txt names {len(report['testset_absent'])} absent photo(s), e.g. "
              f"{report['testset_absent'][0]}; skipped (use --strict_testset to fail)", file=sys.stderr)
