"""The FID/KID job: data-parallel features, cached reference statistics, per-category scores, report."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sketch2real.cli import UserError, check_output_dir, option
from sketch2real.extractors import BLANK_SPREAD, DEFAULT_CLIP, DEFAULT_CSD, DEFAULT_DINOV2
from sketch2real.io import atomic_path, write_json
from sketch2real.metrics import (
    KID_CI95_METHOD,
    VALID_DIMS,
    ImageSet,
    LinearProbe,
    clip_score_of,
    clip_scores,
    cmmd,
    cmmd_ci95,
    csd_estimate,
    csd_of_reference,
    fid_from_features,
    fingerprint,
    fit_linear_probe,
    folder_set,
    frechet_ci95,
    has_transparency,
    holm_adjusted,
    kid,
    kid_ci95,
    kid_difference,
    kid_subset_size,
    mean_ci95,
    paired_difference,
    paired_rows,
    pairing_score,
    prdc,
    proportion_ci95,
    reference_kernel_rows,
    shard_set,
    thumbnails,
    verdict,
    zero_shot_correct,
)
from sketch2real.shards import load_index
from sketch2real.sketchy import category_words, photo_key
from sketch2real.training.accelerator import main_process_view

logger = logging.getLogger("sketch2real")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sketch2real" / "fid"


def parse_generated(entry: str) -> tuple[str | None, str]:
    """One --generated word as (name or None, folder): NAME=DIR only where the text before the first '=' is a plain
    name (no path separator), so runs/lr=1e-4 stays one folder; where the word itself is a folder and the text after
    '=' is not, the word is that folder (lr=1e-4 in the working directory)."""
    name, equals, folder = entry.partition("=")
    if not (equals and name) or "/" in name or os.sep in name or (
            not (folder and Path(folder).is_dir()) and Path(entry).is_dir()):
        return None, entry
    if not folder:
        raise UserError(f"--generated {entry}: no folder after '=' (NAME=DIR)")
    return name, folder


def refuse_same_names(sets: list[ImageSet]) -> None:
    """Two generated sets of one name would share one row of metrics.json and report.md (the second overwriting the
    first) and be compared with themselves: a one-line refusal naming both."""
    seen: dict[str, ImageSet] = {}
    for images in sets:
        if images.name in seen:
            raise UserError(f"two generated sets are named {images.name!r} ({seen[images.name].path or '?'} and "
                            f"{images.path or '?'}): give each its own name with NAME=DIR")
        seen[images.name] = images


def generated_sets(entries: list[str]) -> list[ImageSet]:
    """--generated's folders as image sets, each named by NAME=DIR or its folder (`folder_name`), names unique."""
    sets = [folder_set(folder, name) for name, folder in map(parse_generated, entries)]
    refuse_same_names(sets)
    return sets


def reference_set(opts: EvalOptions) -> ImageSet:
    """The reference: --reference_dir, or --reference_split's --reference_field of --reference_shards."""
    if opts.reference_dir:
        return folder_set(opts.reference_dir)
    load_index(opts.reference_shards, opts.reference_split, "--reference_split")  # its own flag in the message
    return shard_set(opts.reference_shards, opts.reference_split, opts.reference_field, opts.categories or None)


def check_readable(images: ImageSet, valid: np.ndarray) -> None:
    """No image of the set could be read: a one-line error, before any report whose dashes would pass for a result
    (the job's exit status is what a Slurm `afterok` chain goes on)."""
    if len(images) and len(valid) == len(images) and not valid.any():
        raise UserError(f"{images.name} ({images.path or 'in memory'}): none of its {len(images)} images could be read "
                        "(see the corrupt-sample warnings above)")


def features_of(images: ImageSet, extractor, state, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """All ranks extract their part; rank 0 gets (features, valid mask, cache hit). Cached sets skip extraction.
    A set with no readable image is a `UserError` (on every rank: each holds the gathered mask), never cached."""
    from accelerate.utils import gather_object

    cache_file = cache_dir / f"{fingerprint(images, extractor.settings)}.npz" if cache_dir else None
    data = np.load(cache_file) if cache_file is not None and cache_file.is_file() else None
    # a read around unreadable images is a miss: see below
    if main_process_view(state, lambda: data is not None and bool(data["valid"].all())):
        if not state.is_main_process:
            return np.empty((0, 0)), np.empty(0, dtype=bool), True
        check_readable(images, data["valid"])  # a cache written before unreadable sets were refused
        return data["features"], data["valid"], True
    features, valid = extractor.extract(images, state.process_index, state.num_processes, state.is_local_main_process)
    parts = gather_object([(features, valid)]) if state.num_processes > 1 else [(features, valid)]
    # a rank given no batch, or only unreadable images, knows no feature width: its (zero) rows take the others'
    width = max((p[0].shape[1] for p in parts if p[1].any()), default=1)
    features = np.concatenate([p[0] if p[1].any() else np.zeros((len(p[1]), width)) for p in parts])
    valid = np.concatenate([p[1] for p in parts])
    check_readable(images, valid)
    if cache_file is not None and state.is_main_process and not valid.all():  # its key cannot see a repaired copy
        logger.info("%s: features not cached (%d unreadable images; read again next time)", images.name, (~valid).sum())
    elif cache_file is not None and state.is_main_process:
        mu, sigma = np.mean(features[valid], axis=0), np.cov(features[valid], rowvar=False)
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=features, valid=valid, mu=mu, sigma=sigma, ids=np.array(images.ids))
    return features, valid, False


def with_interval(name: str, interval: dict) -> dict:
    """metrics.json keys of a `frechet_ci95` or `cmmd_ci95` result: `<name>_ci95`, and `<name>_ci95_method` or, where
    no interval is honest, `<name>_ci95_reason`."""
    out = {f"{name}_ci95": interval["ci95"]}
    out[f"{name}_ci95_method" if interval["ci95"] is not None else f"{name}_ci95_reason"] = interval.get("method",
                                                                                                   interval.get("reason"))
    return out


def score(generated: np.ndarray, reference: np.ndarray, dims: int, seed: int, resamples: int = 100,
          reference_rows: np.ndarray | None = None) -> dict:
    """FID with its basic-bootstrap interval where one is honest, and KID: the whole-set unbiased value with its
    jackknife interval (`kid`, `kid_ci95`) beside torch-fidelity's mean and std over subsets (`kid_mean`, `kid_std`).
    `reference_rows`: `reference_kernel_rows(reference)`, shared by every set scored against the whole reference."""
    if len(generated) < 2 or len(reference) < 2:
        return {"n_generated": len(generated), "n_reference": len(reference), "fid": None, "kid": None, "kid_mean": None,
                "kid_std": None}
    kid_mean, kid_std = kid(generated, reference, seed=seed)
    fid = fid_from_features(generated, reference)
    result = {"n_generated": len(generated), "n_reference": len(reference), "fid": fid,
              **with_interval("fid", frechet_ci95(generated, reference, seed, resamples, fid)),
              "kid_mean": kid_mean, "kid_std": kid_std,
              "kid_subset_size": kid_subset_size(len(generated), len(reference))}  # the std depends on it
    whole = kid_ci95(generated, reference, b_rows=reference_rows)
    if whole is None:
        return {**result, "kid": None, "kid_ci95": None, "kid_ci95_reason": "no interval from fewer than 3 images"}
    value, se, ci = whole
    return {**result, "kid": value, "kid_se": se, "kid_ci95": ci, "kid_ci95_method": KID_CI95_METHOD}


def evaluate_set(name: str, images: ImageSet, features: np.ndarray, valid: np.ndarray, reference: ImageSet,
                 ref_features: np.ndarray, ref_valid: np.ndarray, dims: int, seed: int, resamples: int = 100,
                 reference_rows: np.ndarray | None = None, pairing_valid: np.ndarray | None = None) -> dict:
    """Overall and per-category FID/KID over the reference's `ref_valid` rows, and the pairing score where images
    name their sample, over its `pairing_valid` rows (default: the same; a photo reference's repeated photos too)."""
    gen_cats, ref_cats = np.array(images.categories), np.array(reference.categories)
    result = score(features[valid], ref_features[ref_valid], dims, seed, resamples, reference_rows)
    result["unreadable"] = int((~valid).sum())
    result["per_category"] = {}
    for category in sorted(set(images.categories) & set(reference.categories)):
        g, r = valid & (gen_cats == category), ref_valid & (ref_cats == category)
        result["per_category"][category] = score(features[g], ref_features[r], dims, seed, resamples)
    pairing_valid = ref_valid if pairing_valid is None else pairing_valid
    ref_position = {k: i for i, k in enumerate(reference.sample_keys) if k}
    pairs = [(i, ref_position[k]) for i, k in enumerate(images.sample_keys)
             if k in ref_position and valid[i] and pairing_valid[ref_position[k]]]
    if len(pairs) >= 2:
        gi, ri = zip(*pairs)
        # the baseline partner: another photo of the same category (pose beyond category)
        categories, photos = [reference.categories[i] for i in ri], [photo_key(reference.sample_keys[i]) for i in ri]
        result["pairing"] = pairing_score(features[list(gi)], ref_features[list(ri)], seed, categories, photos)
        result["pairing_gain"], result["pairing_gain_ci95"] = result["pairing"]["gain"], result["pairing"]["gain_ci95"]
        pixels = pairing_score(thumbnails([images.sources[i] for i in gi]), thumbnails([reference.sources[i] for i in ri]),
                               seed, categories, photos)
        result["pixel_pairing_gain"], result["pixel_pairing_gain_ci95"] = pixels["gain"], pixels["gain_ci95"]
    if 0 < len(features[valid]) < dims:
        lower = ", or --dims 64/192" if dims > 192 else ""
        result["warning"] = (f"only {len(features[valid])} images for {dims}-dim features: FID is dominated by its bias; "
                             f"compare KID, or use more images{lower}")
    return result


def set_differences(extracted: list, ref_features: np.ndarray, reference_rows: np.ndarray | None = None) -> list[dict]:
    """KID(a) - KID(b) against the reference for every pair of sets, with its 95% interval and a verdict from Holm's
    adjusted p-value over the table (`holm_p`). Two generated sets (from index.jsonl) pair the images of one item."""
    rows = []
    reference_rows = reference_kernel_rows(ref_features) if reference_rows is None else reference_rows
    for i, (a, fa, va) in enumerate(extracted):
        for b, fb, vb in extracted[i + 1 :]:
            if va.sum() < 4 or vb.sum() < 4:
                continue
            generated = a.prompts is not None and b.prompts is not None
            pairs = paired_rows(np.asarray(a.ids)[va], np.asarray(b.ids)[vb]) if generated else None
            rows.append({"a": a.name, "b": b.name, **kid_difference(fa[va], fb[vb], ref_features, reference_rows=reference_rows,
                                                                      pairs=pairs)})
    for row, adjusted in zip(rows, holm_adjusted([r["kid_difference_p"] for r in rows])):
        row["holm_p"] = adjusted
        row["verdict"] = "significant" if adjusted < 0.05 else "not distinguishable"
    return rows


BEYOND_INCEPTION = (("fd_dinov2", "FD-DINOv2", 1.0, 2), ("cmmd", "CMMD", 1.0, 3), ("precision", "precision", 1.0, 3),
                    ("recall", "recall", 1.0, 3), ("density", "density", 1.0, 3), ("coverage", "coverage", 1.0, 3),
                    ("clip_accuracy", "CLIP accuracy", 1.0, 3), ("clip_score", "CLIP score", 1.0, 2),
                    ("sketchiness", "sketchiness", 1.0, 3), ("csd", "CSD style", 1.0, 3))


def _interval(value, ci, scale: float = 1.0, digits: int = 2) -> str:
    if value is None:
        return "—"
    if not ci or ci[0] != ci[0]:  # none, or [nan, nan]: none to be had (one image)
        return f"{scale * value:.{digits}f}"
    return f"{scale * value:.{digits}f} [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"


def _style_section(report: dict) -> list[str]:
    """report.md's answer to the study's question: a verdict per set where the intervals allow one, and the chart."""
    lines = ["", "## Style and content: did it learn the sketch style, and keep the content?", ""]
    probe = report.get("sketchiness_probe")
    if probe:
        lines += [f"Sketchiness: a logistic-regression probe on {probe['features']} features ({probe['model']}), fitted on "
                  f"{probe['n_train'] // 2} sketch/photo pairs of split {probe['split']!r} of {probe['shards']}; held-out "
                  f"accuracy {probe['heldout_accuracy']:.3f} ({probe['n_heldout']} images of photos it never saw). Each "
                  "image's probability of being a sketch (0 for a blank canvas); style verdict: the 95% interval of the "
                  "mean above or below 0.5.", ""]
    if "csd" in report["metrics"]:
        lines += [f"CSD (Somepalli et al. 2024): the images' expected cosine to the style prototype of "
                  f"{report['reference']['name']} (the direction of its mean CSD style embedding), estimated as mean(g) · "
                  "mean(r) / |E r| with |E r| from distinct pairs of its images (the plain mean cosine, biased low by a "
                  "prototype of few images, where no interval is honest); the reference's own row is what a new image of "
                  "its style scores; no absolute threshold, compare sets.", ""]
    lines += ["Content kept: CLIP zero-shot category accuracy; verdict against chance (1 / number of categories).", "",
              f"![style vs content]({STYLE_CHART})", "",
              "| generated set | sketchiness [95% CI] | CSD [95% CI] | CLIP accuracy [95% CI] | sketch style? | content kept? | answer |",
              "|---|---:|---:|---:|---|---|---|"]
    anchor = report["reference"]
    for name, r in [(f"reference ({anchor['name']})", anchor), *report["sets"].items()]:
        v = report["style_content"].get(name, {"style": "", "content": "", "answer": "(the reference itself)"})
        lines.append(f"| {name} | {_interval(r.get('sketchiness'), r.get('sketchiness_ci95'), digits=3)} | "
                     f"{_interval(r.get('csd'), r.get('csd_ci95'), digits=3)} | "
                     f"{_interval(r.get('clip_accuracy'), r.get('clip_accuracy_ci95'), digits=3)} | {v['style']} | "
                     f"{v['content']} | {v['answer']} |")
    if report.get("style_differences"):
        lines += ["", "Did one set move the style against another? sketchiness(a) − sketchiness(b) over the items both show "
                  "(one sample, prompt slot and seed), a Student's t 95% interval clustered by photo, Holm's verdict over "
                  "the table (the verdicts above say whether a set's images are sketch-like, which a prompt alone can make "
                  "them).", "", "| a | b | sketchiness(a) − sketchiness(b) [95% CI] | pairs | Holm p | |",
                  "|---|---|---:|---:|---:|---|"]
        for d in report["style_differences"]:
            holm = f"{d['holm_p']:.3g}" if "holm_p" in d else "—"
            lines.append(f"| {d['a']} | {d['b']} | {_interval(d['sketchiness_difference'], d['sketchiness_difference_ci95'], digits=3)} "
                         f"| {d['pairs']} | {holm} | {d.get('verdict', 'no interval')} |")
    return lines


def format_report(report: dict) -> str:
    """Markdown: the study's table (FID, KID, pairing; Inception), the metrics beyond Inception with 95% intervals,
    which sets are distinguishable, then per-category tables.

    Pairing gain: how much closer each generated image is to its own sample's reference than to a reference of
    another photo of its category (cosine, Inception features); pixel pairing gain: the same on grey 16x16
    thumbnails (where shapes are).
    """
    sets = report["sets"]
    inception = any("fid" in r for r in sets.values())
    lines = [f"# Evaluation against {report['reference']['name']} ({report['reference']['n']} images)", "",
             f"Inception resize: {report.get('resize', 'pytorch-fid')}; 95% intervals: KID (whole sets, unbiased) normal "
             "with a jackknife standard error, and CMMD likewise around its unbiased estimate (its reported value keeps "
             "the reference code's biased one); FID and FD-DINOv2, biased upwards at finite sizes, by a basic bootstrap "
             "over both sets' images (reflected about the estimate, which corrects the bias; none with fewer than 2 "
             "images per feature dimension, where no interval is honest); per-image metrics by Student's t over images. "
             "Coverage measured in tests/test_intervals.py (README).", ""]
    # what was compared, so that a report read later (or beside another) says which folders it scored
    lines += ["| compared | folder |", "|---|---|",
              f"| reference: {report['reference']['name']} | `{report['reference'].get('path') or '—'}` |",
              *(f"| {name} | `{r.get('path') or '—'}` |" for name, r in sets.items()), ""]
    if report.get("transparent_images"):
        counts = ", ".join(f"{label} ({n} images)" for label, n in report["transparent_images"].items())
        lines += [f"Transparent images: {counts}. Their transparent pixels are composited on white, as sketches are "
                  "drawn; pytorch-fid's convert('RGB') would make them black where their colour is 0, so its FID of "
                  "these folders differs from this one.", ""]
    if inception:
        lines += [f"## FID / KID ({report['dims']} dims)", "",
                  "| generated set | images | FID [95% CI] | KID ×10³ [95% CI] | pairing gain [95% CI] | pixel pairing gain [95% CI] |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in sets.items():
            pairings = ["—", "—"]
            if "pairing" in r:
                pairings = [_interval(r[f"{k}_gain"], r[f"{k}_gain_ci95"], digits=4) + f" ({verdict(r[f'{k}_gain_ci95'])})"
                            for k in ("pairing", "pixel_pairing")]
            fid = _interval(r.get("fid"), r.get("fid_ci95")) + (" (no interval)" if r.get("fid_ci95_reason") else "")
            lines.append(f"| {name} | {r['n_generated']} | {fid} | {_interval(r.get('kid'), r.get('kid_ci95'), 1000)} | "
                         f"{' | '.join(pairings)} |")
        reasons = [f"FID interval of {name}: {r['fid_ci95_reason']}." for name, r in sets.items() if r.get("fid_ci95_reason")]
        lines += ["", *reasons] if reasons else []
    present = [m for m in BEYOND_INCEPTION if any(r.get(m[0]) is not None for r in sets.values())]
    if present:
        lines += ["", "## Beyond Inception", "", "| generated set | " + " | ".join(m[1] for m in present) + " |",
                  "|---|" + "---:|" * len(present)]
        for name, r in sets.items():
            lines.append(f"| {name} | " + " | ".join(_interval(r.get(k), r.get(f"{k}_ci95"), scale, digits)
                                                     for k, _, scale, digits in present) + " |")
        lines += [f"\n{label} interval of {name}: {r[f'{key}_ci95_reason']}." for name, r in sets.items()
                  for key, label, _, _ in present if r.get(f"{key}_ci95_reason")]
    lines += [f"\nNo {label} of {name}: {r[f'{key}_reason']}." for name, r in sets.items()  # asked for, not computed
              for key, label, _, _ in BEYOND_INCEPTION if r.get(f"{key}_reason")]
    if report.get("style_content"):
        lines += _style_section(report)
    distinct = [(a, b, label) for i, a in enumerate(sets) for b in list(sets)[i + 1 :] for key, label, _, _ in present
                if sets[a].get(f"{key}_ci95") and sets[b].get(f"{key}_ci95")
                and (sets[a][f"{key}_ci95"][1] < sets[b][f"{key}_ci95"][0] or sets[b][f"{key}_ci95"][1] < sets[a][f"{key}_ci95"][0])]
    if report.get("differences") or (present and len(sets) > 1):
        lines += ["", "## Which sets are distinguishable", ""]
    if report.get("differences"):
        count = len(report["differences"])
        lines += ["KID(a) − KID(b), ×10³, with a 95% interval (normal, jackknife over both sets and the reference; two "
                  "generated sets leave out the images of one item together: pairs); negative: a is closer. The verdict "
                  f"is Holm's over the table's {count} comparison{'s' * (count != 1)}: at most a 5% chance of any false "
                  "\"significant\" in it.",
                  "", "| a | b | KID(a) − KID(b) ×10³ [95% CI] | pairs | Holm p | |", "|---|---|---:|---:|---:|---|"]
        for d in report["differences"]:
            lines.append(f"| {d['a']} | {d['b']} | {_interval(d['kid_difference'], d['kid_difference_ci95'], 1000)} | "
                         f"{d.get('pairs', 0)} | {d['holm_p']:.3g} | {d['verdict']} |")
    if present and len(sets) > 1:
        lines += ["", "Beyond Inception, sets whose 95% intervals do not overlap (a conservative test): "
                  + ("; ".join(f"{a} vs {b} on {label}" for a, b, label in distinct) or "none") + "."]
    for name, r in sets.items():
        if r.get("warning"):
            lines += ["", f"Warning ({name}): {r['warning']}"]
        columns = ([("n_generated", "images", 1.0, 0), ("fid", "FID", 1.0, 2), ("kid", "KID ×10³", 1000.0, 2)]
                   if inception else [])
        columns += [m for m in present if m[0] != "clip_score"]
        lines += ["", f"## {name} per category", "", "| category | " + " | ".join(c[1] for c in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for category, c in r.get("per_category", {}).items():
            cells = [_interval(c.get(k), None if k == "n_generated" else c.get(f"{k}_ci95"), scale, digits)
                     for k, _, scale, digits in columns]
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(report: dict, out_file: Path) -> None:
    """FID and KID per category, one bar per generated set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(report["sets"])
    categories = sorted({c for r in report["sets"].values() for c in r["per_category"]})
    # FID above KID, each as wide as its bars need up to 40 inches: side by side, 125 categories x 8 sets drew a
    # 60,300 px wide image no viewer opens
    bars = len(categories) * max(1, len(sets))
    fig, axes = plt.subplots(2, 1, figsize=(min(40.0, max(6.0, 0.3 * bars + 2)), 9))
    width = 0.8 / max(1, len(sets))
    for axis, metric, title in ((axes[0], "fid", "FID"), (axes[1], "kid", "KID")):
        for i, name in enumerate(sets):
            values = [report["sets"][name]["per_category"].get(c, {}).get(metric) or 0.0 for c in categories]
            axis.bar(np.arange(len(categories)) + i * width, values, width, label=name)
        axis.set_xticks(np.arange(len(categories)) + width * (len(sets) - 1) / 2, categories, rotation=45, ha="right",
                        fontsize="small" if len(categories) <= 40 else "xx-small")
        axis.set_title(f"{title} per category (lower is better)")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(out_file) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


METRICS = ("fid", "kid", "fd_dinov2", "cmmd", "prdc", "clip_score", "clip_accuracy", "csd", "sketchiness")
STYLE_METRICS = {"csd", "sketchiness"}
STYLE_CHART = "style_content.png"
NO_PROMPTS = ("its images name no prompt, or only empty ones (unconditional images: nothing to score; an index.jsonl from infer/generate.py does: name the run folder or its "
              "images/)")


def style_content_verdict(result: dict, num_classes: int) -> dict:
    """The study's question for one set, answered only where the 95% intervals allow: did it learn the sketch style
    (sketchiness: the probe's mean probability of "sketch", against its decision point 0.5), and did it keep the
    content (CLIP zero-shot category accuracy, against chance 1/K)?"""
    def side(ci, point: float, above: str, below: str, neither: str) -> str:
        if not ci or ci[0] != ci[0]:
            return "—"
        shifted = verdict([ci[0] - point, ci[1] - point])
        return neither if shifted == "not distinguishable" else (above if ci[0] > point else below)

    chance = 1 / num_classes if num_classes else float("nan")
    style = side(result.get("sketchiness_ci95"), 0.5, "yes", "no (photo-like)", "undecided (interval spans 0.5)")
    content = side(result.get("clip_accuracy_ci95"), chance, "yes (above chance)", "no (below chance)",
                   f"not shown (interval includes chance, {chance:.2f})")
    style_says = {"yes": "learned the sketch style", "no": "did not learn the sketch style", "undecided": "style undecided"}
    content_says = {"yes": "kept the content", "no": "lost the content", "not": "content not shown above chance"}
    first = (style.split(" ")[0], content.split(" ")[0])
    answer = "; ".join(says[word] for says, word in zip((style_says, content_says), first) if word in says) or "—"
    if "undecided" in first or "not" in first:
        answer += " (more images would narrow the intervals)"
    if result.get("blank_images"):
        answer += f" ({result['blank_images']} blank images, counted as not sketches)"
    return {"style": style, "content": content, "answer": answer, "chance": chance}


def style_content_chart(report: dict, out_file: Path) -> list[dict]:
    """Style (x: sketchiness, and CSD in a second panel when both are measured) against content kept (y: CLIP
    category accuracy), a point per set plus the reference, both 95% intervals as whiskers. Returns the points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("reference: " + report["reference"]["name"], report["reference"], "s")] + [
        (name, r, "o") for name, r in report["sets"].items()]
    axes_keys = [(k, label) for k, label in (("sketchiness", "sketchiness (probe: P(sketch))"),
                                             ("csd", f"CSD style similarity to {report['reference']['name']}"))
                 if k in report["metrics"]]
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(5.5 * len(axes_keys), 4.5), squeeze=False)
    points = []
    for axis, (key, label) in zip(axes[0], axes_keys):
        for name, r, marker in rows:
            x, y = r.get(key), r.get("clip_accuracy")
            if x is None or y is None:
                continue
            xci, yci = r.get(f"{key}_ci95") or [x, x], r.get("clip_accuracy_ci95") or [y, y]
            axis.errorbar(x, y, xerr=[[max(x - xci[0], 0)], [max(xci[1] - x, 0)]], yerr=[[max(y - yci[0], 0)], [max(yci[1] - y, 0)]],
                          fmt=marker, capsize=3, label=name)
            points.append({"panel": key, "name": name, "x": x, "y": y})
        if key == "sketchiness":
            axis.axvline(0.5, color="grey", lw=0.8, ls="--")
        chance = next((v["chance"] for v in report.get("style_content", {}).values()), None)
        if chance == chance and chance is not None:
            axis.axhline(chance, color="grey", lw=0.8, ls=":")
        axis.set_xlabel(label)
        axis.set_ylabel("content kept: CLIP category accuracy")
        axis.set_title("style vs content (95% intervals)")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(out_file) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return points
CLIP_PROMPTS = ("a photo of a {category}", "a sketch of a {category}")


@dataclass
class Style:
    """What the style metrics score against: the sketchiness probe (on `probe_features`, an extractor's name) and
    the reference's CSD embeddings (one style prototype, of the whole reference: a category's images are scored
    against the same style, which no category owns)."""

    probe: LinearProbe | None = None
    probe_features: str = "clip"
    csd_reference: np.ndarray | None = None


# Intervals of the images' own outcomes (Wilson's for the shares, Student's t for density) covered 67-92% in simulation
# (100 Gaussian points in 16 and 64 dims, k = 5); half-samples' spread 67-98%, 67% at 20 images: none is given.
PRDC_NO_INTERVAL = ("no honest interval: every image's outcome depends on the k-NN balls of all the others (intervals "
                    "treating them as independent covered 67-92% in simulation); compare sets by FD-DINOv2 or KID")


def extra_scores(metrics: set[str], features: dict, ref_features: dict, categories: np.ndarray,
                 class_embeddings: np.ndarray | None, class_names: list[str], seed: int, resamples: int,
                 style: Style | None = None, clusters: np.ndarray | None = None) -> dict:
    """FD-DINOv2, CMMD, PRDC, CLIP category accuracy, sketchiness and CSD of one set (or one category of it), each with
    its 95% interval: a basic bootstrap over both sets' images for FD-DINOv2 (none where it would not be honest, with
    the reason), the unbiased MMD² ± 1.96 jackknife standard errors for CMMD, Clopper-Pearson's interval for shares of 0/1
    outcomes (CLIP accuracy), jackknife Student's t for CSD (`csd_estimate`), Student's t over per-image
    values for the others; none for PRDC (`PRDC_NO_INTERVAL`). A blank canvas (grey spread below `BLANK_SPREAD`) is
    not a sketch, whatever the probe says of it. `clusters`: each image's photo (`photo_clusters`), whose images
    sketchiness's interval does not count as independent."""
    result: dict = {}
    if "fd_dinov2" in metrics:
        g, r = features["dinov2"], ref_features["dinov2"]
        ok = len(g) >= 2 and len(r) >= 2
        result["fd_dinov2"] = fid_from_features(g, r) if ok else None
        result.update(with_interval("fd_dinov2", frechet_ci95(g, r, seed, resamples, result["fd_dinov2"])) if ok
                      else {"fd_dinov2_ci95": None})
    if "prdc" in metrics:
        g, r = features["dinov2"], ref_features["dinov2"]
        if len(g) >= 2 and len(r) >= 2:
            values = prdc(r, g)
            for name in ("precision", "recall", "density", "coverage"):
                result.update({name: values[name], f"{name}_ci95": None, f"{name}_ci95_reason": PRDC_NO_INTERVAL})
    if "cmmd" in metrics:
        g, r = features["clip"], ref_features["clip"]
        ok = len(g) >= 1 and len(r) >= 1
        result["cmmd"] = cmmd(g, r) if ok else None
        result.update(with_interval("cmmd", cmmd_ci95(g, r)) if ok else {"cmmd_ci95": None})
    if "clip_accuracy" in metrics and class_embeddings is not None and len(features["clip"]):
        # over the images that name a category of the classifier: one that names none cannot be right (a flat
        # folder's scored 0, "lost the content")
        known = np.isin(np.asarray(categories, dtype=object), np.asarray(class_names, dtype=object))
        if known.any():
            correct = zero_shot_correct(features["clip"][known], np.asarray(categories, dtype=object)[known],
                                        class_embeddings, class_names)
            result["clip_accuracy"], result["clip_accuracy_ci95"] = float(correct.mean()), proportion_ci95(correct)
        else:
            result.update(clip_accuracy=None, clip_accuracy_ci95=None, clip_accuracy_reason=(
                "none of its images names a category of the reference (a folder without category subfolders or an "
                "index?): the content it kept cannot be scored"))
    if style is not None and style.probe is not None and len(features[style.probe_features]):
        sketchy, blank = sketchiness_values(features, style)
        if blank is not None:
            result["blank_images"] = int(blank.sum())
        result["sketchiness"], result["sketchiness_ci95"] = float(sketchy.mean()), mean_ci95(sketchy, clusters, (0.0, 1.0))
    if style is not None and style.csd_reference is not None and len(features["csd"]):
        result.update(csd_estimate(features["csd"], style.csd_reference))
    return result


def photo_clusters(images: ImageSet) -> np.ndarray:
    """Each image's photo (of the sample it names, else itself): a photo's sketches, and the several images of one
    sample, are not independent observations. Images of a prompt (`--prompts`) are, given the prompts: each draws
    its own seed (clustered by prompt, one prompt's images were one cluster, and no interval)."""
    return np.asarray([photo_key(key) if key else f"#{i}" for i, key in enumerate(images.sample_keys)], dtype=object)


def sketchiness_values(features: dict, style: Style) -> tuple[np.ndarray, np.ndarray | None]:
    """Each image's sketchiness (the probe's probability of "sketch"; 0 for a blank canvas, grey spread below
    `BLANK_SPREAD`) and which images are blank (None without the grey-spread features)."""
    sketchy = style.probe.probability(features[style.probe_features])
    if "pixels" not in features:
        return sketchy, None
    blank = features["pixels"][:, 0] < BLANK_SPREAD
    return np.where(blank, 0.0, sketchy), blank


def style_differences(generated_sets: list[ImageSet], sets_of: dict, style: Style) -> list[dict]:
    """sketchiness(a) − sketchiness(b) for every two generated sets that show the same items (index.jsonl keys: one
    sample, prompt slot and seed): the mean over the items both show, a Student's t interval clustered by photo (a
    photo's sketches, and an item's images, are not independent), and a verdict by Holm's over the table. Where the
    absolute verdict says whether the images are sketch-like, this says whether a model moved them (a base prompted
    for sketches is sketch-like already)."""
    scored = []
    for index, images in enumerate(generated_sets):
        if images.prompts is None:  # not from index.jsonl: no items to pair
            continue
        valid = np.logical_and.reduce([sets_of[n][index][1] for n in sets_of])  # read by every extractor
        values, _ = sketchiness_values({n: sets_of[n][index][0][valid] for n in sets_of}, style)
        scored.append((images.name, np.asarray(images.ids, dtype=object)[valid], values, photo_clusters(images)[valid]))
    rows = []
    for i, (a, ids_a, values_a, photos_a) in enumerate(scored):
        for b, ids_b, values_b, _ in scored[i + 1 :]:
            rows_a, rows_b = paired_rows(ids_a, ids_b)
            if len(rows_a) < 2:
                continue
            moved = paired_difference(values_a[rows_a], values_b[rows_b], photos_a[rows_a])
            rows.append({"a": a, "b": b, "pairs": len(rows_a), "sketchiness_difference": moved["difference"],
                         "sketchiness_difference_ci95": moved["ci95"], "p": moved["p"]})
    tested = [r for r in rows if r["p"] == r["p"]]
    for row, adjusted in zip(tested, holm_adjusted([r["p"] for r in tested])):
        row["holm_p"] = adjusted
        row["verdict"] = "significant" if adjusted < 0.05 else "not distinguishable"
    return rows


def zero_shot_classifier(clip, class_names: list[str]) -> np.ndarray:
    """Each category's zero-shot classifier: the mean of its prompts' normalised CLIP text embeddings."""
    from sketch2real.extractors import clip_text_embeddings

    rows = []
    for name in class_names:
        embeddings = clip_text_embeddings(clip, [p.format(category=category_words(name)) for p in CLIP_PROMPTS])
        mean = embeddings.mean(0)
        rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows)


def _scores_beyond_inception(metrics: set[str], images: ImageSet, reference: ImageSet, features: dict, ref_features: dict,
                             class_embeddings: np.ndarray | None, class_names: list[str], opts, style: Style | None = None) -> dict:
    """`extra_scores` for the whole set and for each category ({extractor: (features, valid)} in, per-image rows)."""
    names = [n for n in features if n != "inception"]
    categories = np.asarray(images.categories, dtype=object)
    ref_categories = np.asarray(reference.categories, dtype=object)
    photos = photo_clusters(images)

    # an image scored is one every extractor read: the rows of each extractor's features stay aligned
    readable = np.logical_and.reduce([features[n][1] for n in names])
    ref_readable = np.logical_and.reduce([ref_features[n][1] for n in names])

    def scores(where: np.ndarray, ref_where: np.ndarray) -> dict:
        valid = readable & where
        return extra_scores(metrics, {n: features[n][0][valid] for n in names},
                            {n: ref_features[n][0][ref_readable & ref_where] for n in names}, categories[valid],
                            class_embeddings, class_names, opts.seed, opts.bootstrap_resamples, style, photos[valid])

    result = scores(np.ones(len(images), bool), np.ones(len(reference), bool))
    result["per_category"] = {category: scores(categories == category, ref_categories == category)
                              for category in sorted(set(images.categories) & set(reference.categories) - {None, ""})}
    return result


PROBE_HELDOUT = 0.2  # the fraction of the probe's photos (with their sketches) held out for its accuracy


def _subset(images: ImageSet, rows: list[int], name: str, field: str | None = None) -> ImageSet:
    """Rows of a shard ImageSet, optionally reading another field of the same samples (a sketch's photo)."""
    sources = [(s[0], s[1], s[2], field or s[3]) for s in (images.sources[i] for i in rows)]
    return ImageSet(name, sources, [images.ids[i] for i in rows], [images.categories[i] for i in rows],
                    [images.sample_keys[i] for i in rows], path=images.path)


def distinct_images(images: ImageSet) -> np.ndarray:
    """Rows that are the first of their image: a split's photos read from the shards name each photo once per sketch
    (a sample is a pair, ~6 per photo), so a reference of photos counts each photo once (FID, KID and the others are
    of a distribution of images; repeated rows bias KID's unbiased term and narrow the intervals); all rows of any
    other set. Pairing still reads every row: a generated image's own photo is its sample's."""
    keep = np.ones(len(images), dtype=bool)
    seen: set[tuple] = set()
    for i, source in enumerate(images.sources):
        if isinstance(source, tuple) and source[3] == "photo":
            shard_dir, split, key, _ = source
            keep[i] = (shard_dir, split, photo_key(key)) not in seen
            seen.add((shard_dir, split, photo_key(key)))
    return keep


def probe_images(shard_dir: str, split: str, samples: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """The sketchiness probe's data: for up to `samples` photos of a split (seeded), one of its sketches (its first
    key) and the photo itself, as two aligned ImageSets (paired: the probe cannot tell them apart by content)."""
    sketches = shard_set(shard_dir, split, "sketch")
    first: dict[str, int] = {}
    for i, key in enumerate(sketches.sample_keys):
        first.setdefault(photo_key(key), i)
    rows = sorted(first.values())
    chosen = sorted(np.random.default_rng(seed).choice(rows, min(samples, len(rows)), replace=False).tolist())
    return _subset(sketches, chosen, "probe sketches"), _subset(sketches, chosen, "probe photos", "photo")


PROBE_MIN_PAIRS = 10


def check_probe_pairs(pairs: int, split: str, shard_dir: str, readable: str = "") -> None:
    """The probe's minimum of sketch/photo pairs: checked on the split's pairs before any model loads or feature is
    extracted (`run_fid`), and on the readable ones after the probe's extraction."""
    if pairs < PROBE_MIN_PAIRS:
        raise UserError(f"sketchiness: only {pairs} {readable}sketch/photo pairs in split {split!r} of {shard_dir}; the "
                        f"probe needs at least {PROBE_MIN_PAIRS}")


def fit_sketchiness_probe(sketch_features: np.ndarray, photo_features: np.ndarray, seed: int) -> LinearProbe:
    """Logistic regression sketch (1) vs photo (0) on pairs; `PROBE_HELDOUT` of the pairs (photo and its sketch
    together, so no photo is on both sides) held out for its accuracy."""
    order = np.random.default_rng(seed).permutation(len(sketch_features))
    held, train = order[: max(1, round(PROBE_HELDOUT * len(order)))], order[max(1, round(PROBE_HELDOUT * len(order))) :]
    probe = fit_linear_probe(np.concatenate([sketch_features[train], photo_features[train]]),
                             np.r_[np.ones(len(train)), np.zeros(len(train))])
    right = np.r_[probe.probability(sketch_features[held]) > 0.5, probe.probability(photo_features[held]) <= 0.5]
    probe.heldout_accuracy, probe.n_heldout = float(right.mean()), len(right)
    return probe


def sketchiness_probe(shard_dir: str, split: str, samples: int, seed: int, extractor, state, cache_dir: Path | None,
                      output_dir: str | Path) -> tuple[LinearProbe | None, dict]:
    """The probe of a split's paired sketches and photos on `extractor`'s features, from the cache when fitted before
    (keyed by the probe images and the extractor's settings, as reference statistics are), saved reusable as
    `output_dir/sketchiness_probe.npz` (`LinearProbe.load`). Collective: every rank extracts its part, rank 0 fits.
    (probe on rank 0 and None elsewhere, its description for metrics.json)."""
    sketches, photos = probe_images(shard_dir, split, samples, seed)
    settings = {**extractor.settings, "probe": "logistic, l2 1e-2, standardised", "heldout": PROBE_HELDOUT, "seed": seed}
    key = hashlib.sha256(json.dumps([fingerprint(sketches, settings), fingerprint(photos, settings)]).encode()).hexdigest()[:24]
    about = {"features": extractor.name, "model": extractor.settings.get("model", ""), "shards": str(shard_dir),
             "split": split}
    cache_file = cache_dir / f"probe-{key}.npz" if cache_dir else None
    hit = main_process_view(state, lambda: cache_file is not None and cache_file.is_file())
    if hit:
        if not state.is_main_process:
            return None, {}
        probe = LinearProbe.load(cache_file)
    else:
        (s_features, s_valid, _), (p_features, p_valid, _) = (features_of(x, extractor, state, None) for x in (sketches, photos))
        if not state.is_main_process:
            return None, {}
        both = s_valid & p_valid
        check_probe_pairs(int(both.sum()), split, shard_dir, "readable ")
        probe = fit_sketchiness_probe(s_features[both], p_features[both], seed)
        if cache_file is not None:
            probe.save(cache_file, **about)
    probe.save(Path(output_dir) / "sketchiness_probe.npz", **about)
    return probe, {**about, "n_train": probe.n_train, "n_heldout": probe.n_heldout, "heldout_accuracy": probe.heldout_accuracy,
                   "cache_hit": hit}


def _unreadable(reference: ImageSet, generated_sets: list[ImageSet], reference_of: dict, sets_of: dict) -> dict:
    """`corrupt_samples` of metrics.json: every image some extractor could not read (skipped in every score)."""
    keys: set[str] = set()
    for name, (_, valid) in reference_of.items():
        keys |= {f"{reference.name}:{reference.ids[i]}" for i in np.flatnonzero(~valid)}
        for images, (_, set_valid) in zip(generated_sets, sets_of[name]):
            keys |= {f"{images.name}:{images.ids[i]}" for i in np.flatnonzero(~set_valid)}
    return {"count": len(keys), "keys": sorted(keys)}


@dataclass(kw_only=True, frozen=True)
class EvalOptions:
    """Score generated image folders against test photos/sketches from the shards, or against any folder."""

    generated: list[str] = option([], help="generated folders, each NAME=DIR (NAME without '/') or DIR, named by its folder "
                                          "(generate.py's images/ read as its run folder); index.jsonl gives categories")
    reference_dir: str = option("", help="a reference image folder")
    reference_shards: str = option("", help="shard folder whose split gives the reference images")
    reference_split: str = option("test", help="split of --reference_shards")
    reference_field: str = option("photo", help="photo or sketch", choices=("photo", "sketch"), noun="reference field")
    categories: list[str] = option([], help="only these categories, of the reference and of every generated set")
    output_dir: str = option("", help="metrics.json, report.md and fid_per_category.png go here (required)")
    ddp_timeout: int = option(7200, help="seconds a process waits for the others (e.g. behind rank 0's final merge) "
                              "before the job fails", min=1)
    dims: int = option(2048, help="Inception feature size", choices=VALID_DIMS, noun="Inception feature size")
    batch_size: int = option(50, help="images per batch per process", min=1)
    num_workers: int = option(2, help="decoding workers per process (0: in the main process)", min=0)
    resize: int = option(0, help="resize every image to this square size first (0: keep; the network resizes to 299)", min=0)
    seed: int = option(0, help="seed of KID's subsets, the pairing baseline and the --max_samples draw", min=0)
    max_samples: int = option(0, help="score only this many of the reference's samples, drawn by --seed, and the generated "
                                      "images of those samples (the original study's protocol: 100 sketches); 0: all",
                              min=0)
    cache_dir: str = option("", help="reference-statistics cache (default: ~/.cache/sketch2real/fid)")
    no_cache: bool = option(False, help="do not read or write cached reference statistics")
    channels_last: bool = option(False, help="channels-last Inception: ~1.5x faster, FID equal to pytorch-fid's only to "
                                              "~1e-6 relative (off: identical features)")
    clip_model_name_or_path: str = option("", help="CLIP for cmmd, clip_accuracy and clip_score (default "
                                                   f"{DEFAULT_CLIP}); given alone, also reports the CLIP score")
    metrics: list[str] = option(["fid", "kid"], help="metrics to compute (fid and kid also give the pairing scores and "
                                                     "set-vs-set KID differences; csd and sketchiness, the style metrics, "
                                                     "add clip_accuracy, the content kept, and a style-content chart)",
                                choices=METRICS, noun="metric")
    dinov2_model_name_or_path: str = option("", help=f"DINOv2 for fd_dinov2 and prdc (default {DEFAULT_DINOV2})")
    clean_resize: bool = option(False, help="clean-fid's resize: PIL's anti-aliased bicubic to 299 on float pixels before "
                                            "Inception, instead of pytorch-fid's bilinear resize in the network")
    bootstrap_resamples: int = option(100, help="resamples of the bootstrap intervals of FID and FD-DINOv2", min=2)
    csd_model_name_or_path: str = option("", help=f"CSD style model for csd: hub id, folder or checkpoint file (.safetensors, "
                                                  f"or a torch file read with weights_only=True; default {DEFAULT_CSD})")
    probe_shards: str = option("", help="shards whose paired sketches and photos fit the sketchiness probe (default: "
                                        "--reference_shards)")
    probe_split: str = option("train", help="split of --probe_shards the probe is fitted on (never the reference's)")
    probe_features: str = option("clip", help="features of the sketchiness probe", choices=("clip", "dinov2"),
                                 noun="probe features")
    probe_samples: int = option(1000, help="photos (each with one of its sketches) drawn for the probe; a fifth held out "
                                           "for its accuracy", min=10)

    def check(self) -> None:
        """One-line errors for missing or inconsistent values (ranges and choices are checked by `parse_options`)."""
        if not self.generated or not self.output_dir:
            raise UserError("--generated and --output_dir are required")
        if bool(self.reference_dir) == bool(self.reference_shards):
            raise UserError("give exactly one of --reference_dir or --reference_shards")
        if not self.metrics:
            raise UserError(f"--metrics: none given; choose from {', '.join(METRICS)}")
        check_output_dir(self.output_dir, refuse_training_runs=True)


def run_fid(opts: EvalOptions, generated_sets: list[ImageSet], reference: ImageSet, state,
            class_names: list[str] | None = None) -> dict | None:
    """Score every generated set against the reference; rank 0 writes metrics.json, report.md, fid_per_category.png.
    `class_names`: the categories CLIP accuracy chooses among (default: the reference's; a reference cut to some
    categories should still be classified among all of its release's, or one category is trivially right).

    Every collective (feature extraction and gathering, for the reference and every set, for every
    extractor) happens first, on all ranks; then rank 0 scores alone with no collective left. Scoring
    (per-category Fréchet distances, bootstraps, CLIP score) takes minutes on the full Sketchy: other
    ranks must not be waiting in a gather meanwhile, past NCCL's timeout.
    """
    from sketch2real.extractors import (
        DEFAULT_CLIP,
        DEFAULT_CSD,
        DEFAULT_DINOV2,
        clip_extractor,
        csd_extractor,
        dinov2_extractor,
        inception_extractor,
        pixel_spread_extractor,
    )

    refuse_same_names(generated_sets)  # also for callers that built the sets themselves
    metrics = set(opts.metrics)
    if metrics & STYLE_METRICS:
        metrics.add("clip_accuracy")  # content kept, reported beside style
    if "sketchiness" in metrics and not (opts.probe_shards or opts.reference_shards):
        raise UserError("--metrics sketchiness fits its probe on paired sketches and photos: give --probe_shards (or "
                        "--reference_shards)")
    if ("sketchiness" in metrics and opts.reference_shards and opts.probe_split == opts.reference_split
            and Path(opts.probe_shards or opts.reference_shards).resolve() == Path(opts.reference_shards).resolve()):
        raise UserError(f"--probe_split {opts.probe_split} is the reference's own split: fit the probe on another one "
                        "(default: train)")
    if "sketchiness" in metrics:  # before any model loads or any reference feature is extracted
        probe_shards = opts.probe_shards or opts.reference_shards
        load_index(probe_shards, opts.probe_split, "--probe_split")
        pairs = len(probe_images(probe_shards, opts.probe_split, opts.probe_samples, opts.seed)[0])
        check_probe_pairs(pairs, opts.probe_split, probe_shards)
    no_prompts = [s.name for s in generated_sets if not any(s.prompts or [])] if "clip_score" in metrics else []
    if no_prompts:  # asked for, so never dropped silently: null with its reason in metrics.json
        logger.warning("clip_score: no CLIP score for %s: %s", ", ".join(no_prompts), NO_PROMPTS)
    clip_path = opts.clip_model_name_or_path or DEFAULT_CLIP
    extractors = {}
    if metrics & {"fid", "kid"}:
        extractors["inception"] = inception_extractor(opts.dims, state.device, opts.batch_size, opts.num_workers, opts.resize,
                                                      opts.clean_resize, opts.channels_last)
    if metrics & {"fd_dinov2", "prdc"} or ("sketchiness" in metrics and opts.probe_features == "dinov2"):
        extractors["dinov2"] = dinov2_extractor(opts.dinov2_model_name_or_path or DEFAULT_DINOV2,
                                                state.device, opts.batch_size, opts.num_workers)
    if metrics & {"cmmd", "clip_accuracy"}:
        extractors["clip"] = clip_extractor(clip_path, state.device, opts.batch_size, opts.num_workers)
    if "csd" in metrics:
        extractors["csd"] = csd_extractor(opts.csd_model_name_or_path or DEFAULT_CSD, state.device, opts.batch_size,
                                          opts.num_workers)
    if "csd" in metrics and opts.reference_shards and opts.reference_field == "photo":
        logger.warning("csd: scored against the reference's photos: similarity to the photos' style, not the sketches' "
                       "(--reference_field sketch)")
    if "sketchiness" in metrics:
        extractors["pixels"] = pixel_spread_extractor(opts.batch_size, opts.num_workers)
    cache_dir = None if opts.no_cache else Path(opts.cache_dir) if opts.cache_dir else default_cache_dir()
    reference_of, sets_of, hits, readable_of = {}, {}, {}, {}
    distinct = distinct_images(reference)
    for name, extractor in extractors.items():
        features, valid, hits[name] = features_of(reference, extractor, state, cache_dir)
        # scored: each image once (rank 0's: the others hold no features where the cache answered)
        reference_of[name], readable_of[name] = (features, valid & distinct if len(valid) else valid), valid
        sets_of[name] = [features_of(images, extractor, state, None)[:2] for images in generated_sets]
    style = None
    if metrics & STYLE_METRICS:
        style = Style(probe_features=opts.probe_features)
        if "sketchiness" in metrics:
            style.probe, probe_about = sketchiness_probe(opts.probe_shards or opts.reference_shards, opts.probe_split,
                                                          opts.probe_samples, opts.seed, extractors[opts.probe_features],
                                                          state, cache_dir, opts.output_dir)
    if not state.is_main_process:
        return None
    report = {"dims": opts.dims, "metrics": sorted(metrics), "num_processes": state.num_processes,
              "resize": "clean-fid (PIL bicubic, anti-aliased, to 299)" if opts.clean_resize
              else "pytorch-fid (the network's bilinear resize to 299)",
              "reference": {"name": reference.name, "path": reference.path, "n": int(distinct.sum()),
                            "cache_hit": all(hits.values()), "cache_hits": hits},
              "sets": {}}
    transparent = {label: n for label, images in [(f"reference: {reference.name}", reference),
                                                  *((g.name, g) for g in generated_sets)]
                   if (n := sum(map(has_transparency, images.sources)))}
    if transparent:  # only then: most runs' metrics.json stay as they were
        report["transparent_images"] = transparent
    class_names = sorted(set(class_names or reference.categories) - {None, ""})
    if "clip_accuracy" in metrics:
        report["clip_accuracy_classes"] = len(class_names)
    class_embeddings = zero_shot_classifier(extractors["clip"], class_names) if "clip_accuracy" in metrics and class_names else None
    if style is not None:
        if "csd" in metrics:
            style.csd_reference = reference_of["csd"][0][reference_of["csd"][1]]
        if "sketchiness" in metrics:
            report["sketchiness_probe"] = probe_about
        # the reference itself as an anchor of the style-content chart (the whole set only)
        names = [n for n in reference_of if n != "inception"]
        scored = np.logical_and.reduce([reference_of[n][1] for n in names])  # read by every extractor
        own = {n: reference_of[n][0][scored] for n in names}
        report["reference"].update(extra_scores(
            metrics & (STYLE_METRICS | {"clip_accuracy"}), own, own,
            np.asarray(reference.categories, dtype=object)[scored], class_embeddings, class_names,
            opts.seed, opts.bootstrap_resamples, style, photo_clusters(reference)[scored]))
        if "csd" in metrics:  # what a new image of its style scores: not its images against a prototype they are in
            report["reference"].pop("csd_ci95_reason", None)
            report["reference"].update(csd_of_reference(style.csd_reference))
    reference_rows = None
    if "inception" in extractors:
        ref_features, ref_valid = reference_of["inception"]
        reference_rows = reference_kernel_rows(ref_features[ref_valid])  # shared by every set's KID and difference
    extracted = []
    for index, images in enumerate(generated_sets):
        readable = [sets_of[name][index][1] for name in sets_of]
        # scored: the images every extractor read
        result: dict = {"n_generated": int(np.logical_and.reduce(readable).sum()) if readable else len(images)}
        if "inception" in extractors:
            features, valid = sets_of["inception"][index]
            ref_features, ref_valid = reference_of["inception"]
            report["reference"]["n"] = int(ref_valid.sum())
            result = evaluate_set(images.name, images, features, valid, reference, ref_features, ref_valid, opts.dims, opts.seed,
                                  opts.bootstrap_resamples, reference_rows, pairing_valid=readable_of["inception"])
            extracted.append((images, features, valid))
        if set(extractors) - {"inception"}:
            beyond = _scores_beyond_inception(metrics, images, reference, {n: sets_of[n][index] for n in sets_of},
                                              reference_of, class_embeddings, class_names, opts, style)
            for category, values in beyond.pop("per_category").items():
                result.setdefault("per_category", {}).setdefault(category, {}).update(values)
            result.update(beyond)
        prompted = [i for i, prompt in enumerate(images.prompts or []) if prompt]  # not against an empty prompt
        if (opts.clip_model_name_or_path or "clip_score" in metrics) and prompted:
            values = clip_scores([images.sources[i] for i in prompted], [images.prompts[i] for i in prompted], clip_path,
                                 state.device)
            result["clip_score"], result["clip_score_ci95"] = clip_score_of(values)
        elif images.name in no_prompts:
            result.update(clip_score=None, clip_score_ci95=None, clip_score_reason=NO_PROMPTS)
        held, wanted = set(images.categories) - {"", None}, set(reference.categories) - {"", None}
        if held and wanted - held:  # a set of some categories against all: its overall scores mix in the others
            note = (f"its images are of {len(held & wanted)} of the reference's {len(wanted)} categories (none of "
                    f"{', '.join(sorted(wanted - held)[:4])}{' ...' if len(wanted - held) > 4 else ''}): its overall "
                    "scores compare it with all of them; --categories scores the ones it has")
            result["warning"] = f"{result['warning']}; {note}" if result.get("warning") else note
        if held and wanted and held - wanted:  # and the other way: images of categories the reference has none of
            extra = sorted(held - wanted)
            note = (f"{sum(c in held - wanted for c in images.categories)} of its images are of categories the "
                    f"reference has none of ({', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}): its overall "
                    "scores count them against the others; --categories scores the ones the reference has")
            result["warning"] = f"{result['warning']}; {note}" if result.get("warning") else note
        report["sets"][images.name] = {"path": images.path, **result}
    report["corrupt_samples"] = _unreadable(reference, generated_sets, {n: (reference_of[n][0], readable_of[n])
                                                                         for n in reference_of}, sets_of)
    if extracted:
        report["differences"] = set_differences(extracted, reference_of["inception"][0][reference_of["inception"][1]],
                                                reference_rows)
    out = Path(opts.output_dir)
    if style is not None:
        report["style_content"] = {name: style_content_verdict(r, len(class_names)) for name, r in report["sets"].items()}
        if style.probe is not None:
            report["style_differences"] = style_differences(generated_sets, sets_of, style)
        report["style_content_chart"] = style_content_chart(report, out / STYLE_CHART)
    write_json(out / "metrics.json", report)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(format_report(report))
    if "inception" in extractors:
        bar_chart(report, out / "fid_per_category.png")
    return report
