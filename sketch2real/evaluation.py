"""The FID/KID job: data-parallel features, cached reference statistics, per-category scores, report."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from sketch2real.io import atomic_path, write_json
from sketch2real.metrics import (
    ImageSet,
    clip_score,
    extract_features,
    fid_from_features,
    fingerprint,
    inception,
    kid,
    kid_difference,
    pairing_score,
    thumbnails,
    verdict,
)

logger = logging.getLogger("sketch2real")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sketch2real" / "fid"


def features_of(images: ImageSet, model, opts, state, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """All ranks extract their part; rank 0 gets (features, valid mask, cache hit). Cached sets skip extraction."""
    from accelerate.utils import gather_object

    settings = {"dims": opts.dims, "resize": opts.resize, "model": "pytorch-fid-inception-v3",
                **({"channels_last": True} if opts.channels_last else {})}
    cache_file = cache_dir / f"{fingerprint(images, settings)}.npz" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        data = np.load(cache_file)
        return data["features"], data["valid"], True
    features, valid = extract_features(images, model, opts.dims, state.device, opts.batch_size, opts.num_workers,
                                       state.process_index, state.num_processes, opts.resize or None,
                                       progress=state.is_local_main_process, channels_last=opts.channels_last)
    parts = gather_object([(features, valid)]) if state.num_processes > 1 else [(features, valid)]
    features = np.concatenate([p[0] for p in parts])
    valid = np.concatenate([p[1] for p in parts])
    if cache_file is not None and state.is_main_process:
        mu, sigma = np.mean(features[valid], axis=0), np.cov(features[valid], rowvar=False)
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=features, valid=valid, mu=mu, sigma=sigma, ids=np.array(images.ids))
    return features, valid, False


def score(generated: np.ndarray, reference: np.ndarray, dims: int, seed: int) -> dict:
    if len(generated) < 2 or len(reference) < 2:
        return {"n_generated": len(generated), "n_reference": len(reference), "fid": None, "kid_mean": None, "kid_std": None}
    kid_mean, kid_std = kid(generated, reference, seed=seed)
    # KID's subsets give the spread of the estimate: mean ± 1.96 std (a conservative interval: subsets are half-size).
    return {"n_generated": len(generated), "n_reference": len(reference), "fid": fid_from_features(generated, reference),
            "kid_mean": kid_mean, "kid_std": kid_std, "kid_ci95": [kid_mean - 1.96 * kid_std, kid_mean + 1.96 * kid_std]}


def evaluate_set(name: str, images: ImageSet, features: np.ndarray, valid: np.ndarray, reference: ImageSet,
                 ref_features: np.ndarray, ref_valid: np.ndarray, dims: int, seed: int) -> dict:
    """Overall and per-category FID/KID, and the pairing score where images name their sample."""
    gen_cats, ref_cats = np.array(images.categories), np.array(reference.categories)
    result = score(features[valid], ref_features[ref_valid], dims, seed)
    result["unreadable"] = int((~valid).sum())
    result["per_category"] = {}
    for category in sorted(set(images.categories) & set(reference.categories)):
        g, r = valid & (gen_cats == category), ref_valid & (ref_cats == category)
        result["per_category"][category] = score(features[g], ref_features[r], dims, seed)
    ref_position = {k: i for i, k in enumerate(reference.sample_keys) if k}
    pairs = [(i, ref_position[k]) for i, k in enumerate(images.sample_keys) if k in ref_position and valid[i]]
    if len(pairs) >= 2:
        gi, ri = zip(*pairs)
        categories = [reference.categories[i] for i in ri]  # deranged within a category: pose beyond category
        result["pairing"] = pairing_score(features[list(gi)], ref_features[list(ri)], seed, categories)
        result["pairing_gain"], result["pairing_gain_ci95"] = result["pairing"]["gain"], result["pairing"]["gain_ci95"]
        pixels = pairing_score(thumbnails([images.sources[i] for i in gi]), thumbnails([reference.sources[i] for i in ri]),
                               seed, categories)
        result["pixel_pairing_gain"], result["pixel_pairing_gain_ci95"] = pixels["gain"], pixels["gain_ci95"]
    if 0 < len(features[valid]) < dims:
        lower = ", or --dims 64/192" if dims > 192 else ""
        result["warning"] = (f"only {len(features[valid])} images for {dims}-dim features: FID is dominated by its bias; "
                             f"compare KID, or use more images{lower}")
    return result


def set_differences(extracted: list, ref_features: np.ndarray, seed: int) -> list[dict]:
    """KID(a) - KID(b) against the reference for every pair of sets, with its 95% interval and a verdict."""
    rows = []
    for i, (a, fa, va) in enumerate(extracted):
        for b, fb, vb in extracted[i + 1 :]:
            if va.sum() < 4 or vb.sum() < 4:
                continue
            d = kid_difference(fa[va], fb[vb], ref_features, seed)
            rows.append({"a": a.name, "b": b.name, **d, "verdict": verdict(d["kid_difference_ci95"])})
    return rows


def format_report(report: dict) -> str:
    """Markdown: one row per generated set (the study's FID table), then per-category tables.

    Pairing gain: how much closer each generated image is to its own sample's reference than to another
    reference of its category (cosine, Inception features); pixel pairing gain: the same on grey 16x16
    thumbnails (where shapes are).
    """
    def fmt(value, digits=2):
        return "—" if value is None else f"{value:.{digits}f}"

    lines = [f"# FID / KID against {report['reference']['name']} ({report['reference']['n']} images, {report['dims']} dims)", "",
             "| generated set | images | FID | KID ×10³ [95% CI] | pairing gain [95% CI] | pixel pairing gain [95% CI] | CLIP score |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def interval(value, ci, scale=1.0, digits=2):
        return "—" if value is None else f"{scale * value:.{digits}f} [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"

    for name, r in report["sets"].items():
        kid_text = interval(r["kid_mean"], r["kid_ci95"], 1000)
        pairings = ["—", "—"]
        if "pairing" in r:
            pairings = [interval(r[f"{k}_gain"], r[f"{k}_gain_ci95"], digits=4) + f" ({verdict(r[f'{k}_gain_ci95'])})"
                        for k in ("pairing", "pixel_pairing")]
        lines.append(f"| {name} | {r['n_generated']} | {fmt(r['fid'])} | {kid_text} | {' | '.join(pairings)} | "
                     f"{fmt(r.get('clip_score'))} |")
    if report.get("differences"):
        lines += ["", "## Which sets are closer to the reference", "",
                  "KID(a) − KID(b), ×10³, with a 95% interval (half-sampling of both sets and the reference); negative: a is closer.",
                  "", "| a | b | KID(a) − KID(b) ×10³ [95% CI] | |", "|---|---|---:|---|"]
        for d in report["differences"]:
            lines.append(f"| {d['a']} | {d['b']} | {interval(d['kid_difference'], d['kid_difference_ci95'], 1000)} | {d['verdict']} |")
    for name, r in report["sets"].items():
        if r.get("warning"):
            lines += ["", f"Warning ({name}): {r['warning']}"]
        lines += ["", f"## {name} per category", "", "| category | images | FID | KID ×10³ |", "|---|---:|---:|---:|"]
        for category, c in r["per_category"].items():
            kid_text = "—" if c["kid_mean"] is None else f"{1000 * c['kid_mean']:.2f}"
            lines.append(f"| {category} | {c['n_generated']} | {fmt(c['fid'])} | {kid_text} |")
    return "\n".join(lines) + "\n"


def bar_chart(report: dict, out_file: Path) -> None:
    """FID and KID per category, one bar per generated set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(report["sets"])
    categories = sorted({c for r in report["sets"].values() for c in r["per_category"]})
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(categories) * max(1, len(sets)) / 2 + 3), 4))
    width = 0.8 / max(1, len(sets))
    for axis, metric, title in ((axes[0], "fid", "FID"), (axes[1], "kid_mean", "KID")):
        for i, name in enumerate(sets):
            values = [report["sets"][name]["per_category"].get(c, {}).get(metric) or 0.0 for c in categories]
            axis.bar(np.arange(len(categories)) + i * width, values, width, label=name)
        axis.set_xticks(np.arange(len(categories)) + width * (len(sets) - 1) / 2, categories, rotation=45, ha="right")
        axis.set_title(f"{title} per category (lower is better)")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(out_file) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run_fid(opts, generated_sets: list[ImageSet], reference: ImageSet, state) -> dict | None:
    """Score every generated set against the reference; rank 0 writes metrics.json, report.md, fid_per_category.png.

    Every collective (feature extraction and gathering, for the reference and every set) happens
    first, on all ranks; then rank 0 scores alone with no collective left. Scoring (per-category
    Fréchet distances, CLIP score) takes minutes on the full Sketchy: other ranks must not be
    waiting in a gather meanwhile, past NCCL's timeout.
    """
    model = inception(opts.dims, state.device, opts.channels_last)
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else (default_cache_dir() if not opts.no_cache else None)
    ref_features, ref_valid, hit = features_of(reference, model, opts, state, cache_dir)
    extracted = [(images, *features_of(images, model, opts, state, None)[:2]) for images in generated_sets]
    if not state.is_main_process:
        return None
    logger.info("reference statistics %s", "loaded from cache" if hit else "computed")
    report = {"dims": opts.dims, "reference": {"name": reference.name, "n": int(ref_valid.sum()), "cache_hit": hit}, "sets": {}}
    for images, features, valid in extracted:
        report["sets"][images.name] = evaluate_set(images.name, images, features, valid, reference, ref_features,
                                                   ref_valid, opts.dims, opts.seed)
        if opts.clip_model_name_or_path and images.prompts:
            report["sets"][images.name]["clip_score"] = clip_score(images.sources, images.prompts,
                                                                   opts.clip_model_name_or_path, state.device)
    report["differences"] = set_differences(extracted, ref_features[ref_valid], opts.seed)
    out = Path(opts.output_dir)
    write_json(out / "metrics.json", report)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(format_report(report))
    bar_chart(report, out / "fid_per_category.png")
    return report
