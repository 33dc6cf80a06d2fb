"""FID (pytorch-fid's Inception, identical values), KID, FD-DINOv2, CMMD, PRDC, CLIP accuracy and score, overall and per
category, each with a 95% interval: `python eval/fid.py --help`."""

from __future__ import annotations

from dataclasses import dataclass

from sketch2real.cli import UserError, option, parse_options, run_main
from sketch2real.evaluation import BEYOND_INCEPTION, METRICS, run_fid
from sketch2real.extractors import DEFAULT_CLIP, DEFAULT_DINOV2
from sketch2real.metrics import folder_set, shard_set


@dataclass(kw_only=True)
class Options:
    """Score generated image folders against test photos/sketches from the shards, or against any folder."""

    generated: list[str] = option([], help="generated folders, each DIR or NAME=DIR (index.jsonl gives categories)")
    reference_dir: str = option("", help="a reference image folder")
    reference_shards: str = option("", help="shard folder whose split gives the reference images")
    reference_split: str = option("test", help="split of --reference_shards")
    reference_field: str = option("photo", help="photo or sketch")
    categories: list[str] = option([], help="only these categories of the reference shards")
    output_dir: str = option("", help="metrics.json, report.md and fid_per_category.png go here (required)")
    dims: int = option(2048, help="Inception feature size: 2048, 768, 192 or 64")
    batch_size: int = option(50, help="images per batch per process")
    num_workers: int = option(2, help="decoding workers per process")
    resize: int = option(0, help="resize every image to this square size first (0: keep; the network resizes to 299)")
    seed: int = option(0, help="seed of KID's subsets and the pairing baseline")
    cache_dir: str = option("", help="reference-statistics cache (default: ~/.cache/sketch2real/fid)")
    no_cache: bool = option(False, help="do not read or write cached reference statistics")
    channels_last: bool = option(False, help="channels-last Inception: ~1.5x faster, FID equal to pytorch-fid's only to "
                                              "~1e-6 relative (off: identical features)")
    clip_model_name_or_path: str = option("", help="CLIP for cmmd, clip_accuracy and clip_score (default "
                                                   f"{DEFAULT_CLIP}); given alone, also reports the CLIP score")
    metrics: list[str] = option(["fid", "kid"], help=f"any of {', '.join(METRICS)} (fid and kid also give the pairing "
                                                     "scores and set-vs-set KID differences)")
    dinov2_model_name_or_path: str = option("", help=f"DINOv2 for fd_dinov2 and prdc (default {DEFAULT_DINOV2})")
    clean_resize: bool = option(False, help="clean-fid's resize: PIL's anti-aliased bicubic to 299 on float pixels before "
                                            "Inception, instead of pytorch-fid's bilinear resize in the network")
    bootstrap_resamples: int = option(100, help="resamples of the bootstrap intervals of FD-DINOv2 and CMMD")


def main() -> int:
    from accelerate import PartialState

    opts = parse_options(Options)
    if not opts.generated or not opts.output_dir:
        raise UserError("--generated and --output_dir are required")
    if bool(opts.reference_dir) == bool(opts.reference_shards):
        raise UserError("give exactly one of --reference_dir or --reference_shards")
    unknown = sorted(set(opts.metrics) - set(METRICS))
    if unknown or not opts.metrics:
        raise UserError(f"--metrics: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")
    if opts.reference_field not in ("photo", "sketch"):
        raise UserError(f"--reference_field must be photo or sketch, got {opts.reference_field!r}")
    sets = []
    for entry in opts.generated:
        name, _, folder = entry.rpartition("=")
        sets.append(folder_set(folder, name or None))
    reference = (folder_set(opts.reference_dir) if opts.reference_dir
                 else shard_set(opts.reference_shards, opts.reference_split, opts.reference_field, opts.categories or None))
    state = PartialState()
    report = run_fid(opts, sets, reference, state)
    if report is not None:
        for name, result in report["sets"].items():
            parts = []
            if "fid" in result:
                fid = "—" if result["fid"] is None else f"{result['fid']:.3f}"
                kid_mean = "—" if result["kid_mean"] is None else (f"{result['kid_mean']:.5f} [{result['kid_ci95'][0]:.5f}, "
                                                                  f"{result['kid_ci95'][1]:.5f}]")
                parts.append(f"FID {fid}  KID {kid_mean}")
            for key, label, _, _ in BEYOND_INCEPTION:
                if result.get(key) is not None:
                    ci = result.get(f"{key}_ci95") or [float("nan")] * 2
                    parts.append(f"{label} {result[key]:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]")
            print(f"{name}: {'  '.join(parts)}  ({result['n_generated']} vs {report['reference']['n']} images)")
            if result.get("warning"):
                print(f"warning: {result['warning']}")
        for d in report.get("differences", []):
            print(f"KID({d['a']}) - KID({d['b']}): {d['kid_difference']:+.5f} [{d['kid_difference_ci95'][0]:+.5f}, "
                  f"{d['kid_difference_ci95'][1]:+.5f}] {d['verdict']}")
        print(f"report: {opts.output_dir}/report.md")
    return 0


if __name__ == "__main__":
    run_main(main)
