"""FID (pytorch-fid's Inception, identical values), KID, FD-DINOv2, CMMD, PRDC, CLIP accuracy and score, and style
(CSD, sketchiness), overall and per category, each with a 95% interval: `python eval/fid.py --help`."""

from __future__ import annotations

from dataclasses import dataclass

from sketch2real.cli import UserError, check_output_dir, option, parse_options, run_main
from sketch2real.evaluation import BEYOND_INCEPTION, METRICS, run_fid
from sketch2real.extractors import DEFAULT_CLIP, DEFAULT_CSD, DEFAULT_DINOV2
from sketch2real.metrics import VALID_DIMS, folder_set, shard_set


@dataclass(kw_only=True, frozen=True)
class Options:
    """Score generated image folders against test photos/sketches from the shards, or against any folder."""

    generated: list[str] = option([], help="generated folders, each DIR or NAME=DIR (index.jsonl gives categories)")
    reference_dir: str = option("", help="a reference image folder")
    reference_shards: str = option("", help="shard folder whose split gives the reference images")
    reference_split: str = option("test", help="split of --reference_shards")
    reference_field: str = option("photo", help="photo or sketch", choices=("photo", "sketch"), noun="reference field")
    categories: list[str] = option([], help="only these categories of the reference shards")
    output_dir: str = option("", help="metrics.json, report.md and fid_per_category.png go here (required)")
    ddp_timeout: int = option(7200, help="seconds a process waits for the others (e.g. behind rank 0's final merge) "
                              "before the job fails", min=1)
    dims: int = option(2048, help="Inception feature size", choices=VALID_DIMS, noun="Inception feature size")
    batch_size: int = option(50, help="images per batch per process", min=1)
    num_workers: int = option(2, help="decoding workers per process (0: in the main process)", min=0)
    resize: int = option(0, help="resize every image to this square size first (0: keep; the network resizes to 299)", min=0)
    seed: int = option(0, help="seed of KID's subsets and the pairing baseline", min=0)
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


def main() -> int:
    from sketch2real.training.accelerator import check_shared_folder, distributed_state

    opts = parse_options(Options)
    if not opts.generated or not opts.output_dir:
        raise UserError("--generated and --output_dir are required")
    if bool(opts.reference_dir) == bool(opts.reference_shards):
        raise UserError("give exactly one of --reference_dir or --reference_shards")
    if not opts.metrics:
        raise UserError(f"--metrics: none given; choose from {', '.join(METRICS)}")
    check_output_dir(opts.output_dir)
    sets = []
    for entry in opts.generated:
        name, _, folder = entry.rpartition("=")
        sets.append(folder_set(folder, name or None))
    reference = (folder_set(opts.reference_dir) if opts.reference_dir
                 else shard_set(opts.reference_shards, opts.reference_split, opts.reference_field, opts.categories or None))
    state = distributed_state(opts.ddp_timeout)
    check_shared_folder(state, opts.output_dir)
    report = run_fid(opts, sets, reference, state)
    if report is not None:
        for name, result in report["sets"].items():
            parts = []
            if "fid" in result:
                fid = "—" if result["fid"] is None else f"{result['fid']:.3f}"
                if result.get("fid_ci95"):
                    fid += f" [{result['fid_ci95'][0]:.3f}, {result['fid_ci95'][1]:.3f}]"
                kid = "—" if result.get("kid") is None else (f"{result['kid']:.5f} [{result['kid_ci95'][0]:.5f}, "
                                                             f"{result['kid_ci95'][1]:.5f}]")
                parts.append(f"FID {fid}  KID {kid}")
            for key, label, _, _ in BEYOND_INCEPTION:
                if result.get(key) is not None:
                    ci = result.get(f"{key}_ci95")
                    parts.append(f"{label} {result[key]:.4f} " + (f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "(no interval)"))
            print(f"{name}: {'  '.join(parts)}  ({result['n_generated']} vs {report['reference']['n']} images)")
            if result.get("warning"):
                print(f"warning: {result['warning']}")
            if result.get("fid_ci95_reason"):
                print(f"FID interval: {result['fid_ci95_reason']}")
            if name in report.get("style_content", {}):
                print(f"  style and content: {report['style_content'][name]['answer']}")
        for d in report.get("differences", []):
            print(f"KID({d['a']}) - KID({d['b']}): {d['kid_difference']:+.5f} [{d['kid_difference_ci95'][0]:+.5f}, "
                  f"{d['kid_difference_ci95'][1]:+.5f}] {d['verdict']}")
        print(f"report: {opts.output_dir}/report.md")
    return 0


if __name__ == "__main__":
    run_main(main)
