"""The FID/KID job: data-parallel features, cached reference statistics, per-category scores, report."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from sketch2real.io import atomic_path, write_json
from sketch2real.metrics import (
    ImageSet,
    bootstrap_ci95,
    clip_scores,
    cmmd,
    fid_from_features,
    fingerprint,
    kid,
    kid_difference,
    mean_ci95,
    pairing_score,
    prdc,
    thumbnails,
    verdict,
    zero_shot_correct,
)
from sketch2real.sketchy import category_words, photo_key

logger = logging.getLogger("sketch2real")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sketch2real" / "fid"


def features_of(images: ImageSet, extractor, state, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """All ranks extract their part; rank 0 gets (features, valid mask, cache hit). Cached sets skip extraction."""
    from accelerate.utils import gather_object

    cache_file = cache_dir / f"{fingerprint(images, extractor.settings)}.npz" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        data = np.load(cache_file)
        return data["features"], data["valid"], True
    features, valid = extractor.extract(images, state.process_index, state.num_processes, state.is_local_main_process)
    parts = gather_object([(features, valid)]) if state.num_processes > 1 else [(features, valid)]
    features = np.concatenate([p[0] for p in parts])
    valid = np.concatenate([p[1] for p in parts])
    if cache_file is not None and state.is_main_process:
        mu, sigma = np.mean(features[valid], axis=0), np.cov(features[valid], rowvar=False)
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=features, valid=valid, mu=mu, sigma=sigma, ids=np.array(images.ids))
    return features, valid, False


def score(generated: np.ndarray, reference: np.ndarray, dims: int, seed: int, resamples: int = 100) -> dict:
    """FID with a bootstrap interval (both sets resampled), and KID with its subsets' interval."""
    if len(generated) < 2 or len(reference) < 2:
        return {"n_generated": len(generated), "n_reference": len(reference), "fid": None, "kid_mean": None, "kid_std": None}
    kid_mean, kid_std = kid(generated, reference, seed=seed)
    # KID's subsets give the spread of the estimate: mean ± 1.96 std (a conservative interval: subsets are half-size).
    return {"n_generated": len(generated), "n_reference": len(reference), "fid": fid_from_features(generated, reference),
            "fid_ci95": bootstrap_ci95(fid_from_features, generated, reference, seed, resamples),
            "kid_mean": kid_mean, "kid_std": kid_std, "kid_ci95": [kid_mean - 1.96 * kid_std, kid_mean + 1.96 * kid_std]}


def evaluate_set(name: str, images: ImageSet, features: np.ndarray, valid: np.ndarray, reference: ImageSet,
                 ref_features: np.ndarray, ref_valid: np.ndarray, dims: int, seed: int, resamples: int = 100) -> dict:
    """Overall and per-category FID/KID, and the pairing score where images name their sample."""
    gen_cats, ref_cats = np.array(images.categories), np.array(reference.categories)
    result = score(features[valid], ref_features[ref_valid], dims, seed, resamples)
    result["unreadable"] = int((~valid).sum())
    result["per_category"] = {}
    for category in sorted(set(images.categories) & set(reference.categories)):
        g, r = valid & (gen_cats == category), ref_valid & (ref_cats == category)
        result["per_category"][category] = score(features[g], ref_features[r], dims, seed, resamples)
    ref_position = {k: i for i, k in enumerate(reference.sample_keys) if k}
    pairs = [(i, ref_position[k]) for i, k in enumerate(images.sample_keys) if k in ref_position and valid[i]]
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


BEYOND_INCEPTION = (("fd_dinov2", "FD-DINOv2", 1.0, 2), ("cmmd", "CMMD", 1.0, 3), ("precision", "precision", 1.0, 3),
                    ("recall", "recall", 1.0, 3), ("density", "density", 1.0, 3), ("coverage", "coverage", 1.0, 3),
                    ("clip_accuracy", "CLIP accuracy", 1.0, 3), ("clip_score", "CLIP score", 1.0, 2))


def _interval(value, ci, scale: float = 1.0, digits: int = 2) -> str:
    if value is None:
        return "—"
    if not ci:
        return f"{scale * value:.{digits}f}"
    return f"{scale * value:.{digits}f} [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"


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
             f"Inception resize: {report.get('resize', 'pytorch-fid')}; 95% intervals: KID from its subsets, FID and the "
             "other distances by bootstrap over both sets' images, per-image metrics by bootstrap over images.", ""]
    if inception:
        lines += [f"## FID / KID ({report['dims']} dims)", "",
                  "| generated set | images | FID [95% CI] | KID ×10³ [95% CI] | pairing gain [95% CI] | pixel pairing gain [95% CI] |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in sets.items():
            pairings = ["—", "—"]
            if "pairing" in r:
                pairings = [_interval(r[f"{k}_gain"], r[f"{k}_gain_ci95"], digits=4) + f" ({verdict(r[f'{k}_gain_ci95'])})"
                            for k in ("pairing", "pixel_pairing")]
            fid = _interval(r.get("fid"), r.get("fid_ci95"))
            lines.append(f"| {name} | {r['n_generated']} | {fid} | {_interval(r['kid_mean'], r['kid_ci95'], 1000)} | "
                         f"{' | '.join(pairings)} |")
    present = [m for m in BEYOND_INCEPTION if any(r.get(m[0]) is not None for r in sets.values())]
    if present:
        lines += ["", "## Beyond Inception", "", "| generated set | " + " | ".join(m[1] for m in present) + " |",
                  "|---|" + "---:|" * len(present)]
        for name, r in sets.items():
            lines.append(f"| {name} | " + " | ".join(_interval(r.get(k), r.get(f"{k}_ci95"), scale, digits)
                                                     for k, _, scale, digits in present) + " |")
    distinct = [(a, b, label) for i, a in enumerate(sets) for b in list(sets)[i + 1 :] for key, label, _, _ in present
                if sets[a].get(f"{key}_ci95") and sets[b].get(f"{key}_ci95")
                and (sets[a][f"{key}_ci95"][1] < sets[b][f"{key}_ci95"][0] or sets[b][f"{key}_ci95"][1] < sets[a][f"{key}_ci95"][0])]
    if report.get("differences") or (present and len(sets) > 1):
        lines += ["", "## Which sets are distinguishable", ""]
    if report.get("differences"):
        lines += ["KID(a) − KID(b), ×10³, with a 95% interval (half-sampling of both sets and the reference); negative: a is closer.",
                  "", "| a | b | KID(a) − KID(b) ×10³ [95% CI] | |", "|---|---|---:|---|"]
        for d in report["differences"]:
            lines.append(f"| {d['a']} | {d['b']} | {_interval(d['kid_difference'], d['kid_difference_ci95'], 1000)} | {d['verdict']} |")
    if present and len(sets) > 1:
        lines += ["", "Beyond Inception, sets whose 95% intervals do not overlap (a conservative test): "
                  + ("; ".join(f"{a} vs {b} on {label}" for a, b, label in distinct) or "none") + "."]
    for name, r in sets.items():
        if r.get("warning"):
            lines += ["", f"Warning ({name}): {r['warning']}"]
        columns = ([("n_generated", "images", 1.0, 0), ("fid", "FID", 1.0, 2), ("kid_mean", "KID ×10³", 1000.0, 2)]
                   if inception else [])
        columns += [m for m in present if m[0] != "clip_score"]
        lines += ["", f"## {name} per category", "", "| category | " + " | ".join(c[1] for c in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for category, c in r.get("per_category", {}).items():
            cells = [_interval(c.get(k), None if k == "n_generated" else c.get({"kid_mean": "kid_ci95"}.get(k, f"{k}_ci95")),
                               scale, digits)
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


METRICS = ("fid", "kid", "fd_dinov2", "cmmd", "prdc", "clip_score", "clip_accuracy")
CLIP_PROMPTS = ("a photo of a {category}", "a sketch of a {category}")


def extra_scores(metrics: set[str], features: dict, ref_features: dict, categories: np.ndarray,
                 class_embeddings: np.ndarray | None, class_names: list[str], seed: int, resamples: int) -> dict:
    """FD-DINOv2, CMMD, PRDC and CLIP category accuracy of one set (or one category of it), each with its 95% interval:
    a bootstrap over both sets' images for the set-vs-set distances, over per-image values for the others."""
    result: dict = {}
    if "fd_dinov2" in metrics:
        g, r = features["dinov2"], ref_features["dinov2"]
        ok = len(g) >= 2 and len(r) >= 2
        result["fd_dinov2"] = fid_from_features(g, r) if ok else None
        result["fd_dinov2_ci95"] = bootstrap_ci95(fid_from_features, g, r, seed, resamples) if ok else None
    if "prdc" in metrics:
        g, r = features["dinov2"], ref_features["dinov2"]
        if len(g) >= 2 and len(r) >= 2:
            values = prdc(r, g)
            for name in ("precision", "recall", "density", "coverage"):
                result[name], result[f"{name}_ci95"] = values[name], mean_ci95(values[f"{name}_items"], seed)
    if "cmmd" in metrics:
        g, r = features["clip"], ref_features["clip"]
        ok = len(g) >= 1 and len(r) >= 1
        result["cmmd"] = cmmd(g, r) if ok else None
        result["cmmd_ci95"] = bootstrap_ci95(cmmd, g, r, seed, resamples) if ok else None
    if "clip_accuracy" in metrics and class_embeddings is not None and len(features["clip"]):
        correct = zero_shot_correct(features["clip"], categories, class_embeddings, class_names)
        result["clip_accuracy"], result["clip_accuracy_ci95"] = float(correct.mean()), mean_ci95(correct, seed)
    return result


def _class_embeddings(clip, class_names: list[str]) -> np.ndarray:
    """Each category's zero-shot classifier: the mean of its prompts' normalised CLIP text embeddings."""
    from sketch2real.extractors import clip_text_embeddings

    rows = []
    for name in class_names:
        embeddings = clip_text_embeddings(clip, [p.format(category=category_words(name)) for p in CLIP_PROMPTS])
        mean = embeddings.mean(0)
        rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows)


def _scores_beyond_inception(metrics: set[str], images: ImageSet, reference: ImageSet, features: dict, ref_features: dict,
                             class_embeddings: np.ndarray | None, class_names: list[str], opts) -> dict:
    """`extra_scores` for the whole set and for each category ({extractor: (features, valid)} in, per-image rows)."""
    names = [n for n in features if n != "inception"]
    categories = np.asarray(images.categories, dtype=object)
    ref_categories = np.asarray(reference.categories, dtype=object)

    def scores(where: np.ndarray, ref_where: np.ndarray) -> dict:
        valid = features[names[0]][1] & where
        return extra_scores(metrics, {n: features[n][0][features[n][1] & where] for n in names},
                            {n: ref_features[n][0][ref_features[n][1] & ref_where] for n in names}, categories[valid],
                            class_embeddings, class_names, opts.seed, opts.bootstrap_resamples)

    result = scores(np.ones(len(images), bool), np.ones(len(reference), bool))
    result["per_category"] = {category: scores(categories == category, ref_categories == category)
                              for category in sorted(set(images.categories) & set(reference.categories) - {None, ""})}
    return result


def run_fid(opts, generated_sets: list[ImageSet], reference: ImageSet, state) -> dict | None:
    """Score every generated set against the reference; rank 0 writes metrics.json, report.md, fid_per_category.png.

    Every collective (feature extraction and gathering, for the reference and every set, for every
    extractor) happens first, on all ranks; then rank 0 scores alone with no collective left. Scoring
    (per-category Fréchet distances, bootstraps, CLIP score) takes minutes on the full Sketchy: other
    ranks must not be waiting in a gather meanwhile, past NCCL's timeout.
    """
    from sketch2real.extractors import DEFAULT_CLIP, DEFAULT_DINOV2, clip_extractor, dinov2_extractor, inception_extractor

    metrics = set(opts.metrics)
    clip_path = opts.clip_model_name_or_path or DEFAULT_CLIP
    extractors = {}
    if metrics & {"fid", "kid"}:
        extractors["inception"] = inception_extractor(opts.dims, state.device, opts.batch_size, opts.num_workers, opts.resize,
                                                      opts.clean_resize, opts.channels_last)
    if metrics & {"fd_dinov2", "prdc"}:
        extractors["dinov2"] = dinov2_extractor(opts.dinov2_model_name_or_path or DEFAULT_DINOV2,
                                                state.device, opts.batch_size, opts.num_workers)
    if metrics & {"cmmd", "clip_accuracy"}:
        extractors["clip"] = clip_extractor(clip_path, state.device, opts.batch_size, opts.num_workers)
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else (default_cache_dir() if not opts.no_cache else None)
    reference_of, sets_of, hits = {}, {}, {}
    for name, extractor in extractors.items():
        features, valid, hits[name] = features_of(reference, extractor, state, cache_dir)
        reference_of[name] = (features, valid)
        sets_of[name] = [features_of(images, extractor, state, None)[:2] for images in generated_sets]
    if not state.is_main_process:
        return None
    report = {"dims": opts.dims, "metrics": sorted(metrics),
              "resize": "clean-fid (PIL bicubic, anti-aliased, to 299)" if opts.clean_resize
              else "pytorch-fid (the network's bilinear resize to 299)",
              "reference": {"name": reference.name, "n": len(reference), "cache_hit": all(hits.values()), "cache_hits": hits},
              "sets": {}}
    class_names = sorted(set(reference.categories) - {None, ""})
    class_embeddings = _class_embeddings(extractors["clip"], class_names) if "clip_accuracy" in metrics and class_names else None
    extracted = []
    for index, images in enumerate(generated_sets):
        result: dict = {"n_generated": len(images)}
        if "inception" in extractors:
            features, valid = sets_of["inception"][index]
            ref_features, ref_valid = reference_of["inception"]
            report["reference"]["n"] = int(ref_valid.sum())
            result = evaluate_set(images.name, images, features, valid, reference, ref_features, ref_valid, opts.dims, opts.seed,
                                  opts.bootstrap_resamples)
            extracted.append((images, features, valid))
        if set(extractors) - {"inception"}:
            beyond = _scores_beyond_inception(metrics, images, reference, {n: sets_of[n][index] for n in sets_of},
                                              reference_of, class_embeddings, class_names, opts)
            for category, values in beyond.pop("per_category").items():
                result.setdefault("per_category", {}).setdefault(category, {}).update(values)
            result.update(beyond)
        if (opts.clip_model_name_or_path or "clip_score" in metrics) and images.prompts:
            values = clip_scores(images.sources, images.prompts, clip_path, state.device)
            result["clip_score"], result["clip_score_ci95"] = float(values.mean()), mean_ci95(values, opts.seed)
        report["sets"][images.name] = result
    if extracted:
        report["differences"] = set_differences(extracted, reference_of["inception"][0][reference_of["inception"][1]], opts.seed)
    out = Path(opts.output_dir)
    write_json(out / "metrics.json", report)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(format_report(report))
    if "inception" in extractors:
        bar_chart(report, out / "fid_per_category.png")
    return report
