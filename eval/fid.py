"""FID (pytorch-fid's Inception, identical values), KID, FD-DINOv2, CMMD, PRDC, CLIP accuracy and score, and style
(CSD, sketchiness), overall and per category, each with a 95% interval: `python eval/fid.py --help`."""

from __future__ import annotations

from sketch2real.cli import parse_options, run_main
from sketch2real.evaluation import BEYOND_INCEPTION, generated_sets, reference_set, run_fid
from sketch2real.evaluation import EvalOptions as Options
from sketch2real.metrics import drawn_samples, of_categories, of_samples, shard_set


def main() -> int:
    from sketch2real.training.accelerator import check_shared_folder, distributed_state

    opts = parse_options(Options)
    opts.check()
    sets = generated_sets(opts.generated)
    reference = reference_set(opts)
    # CLIP accuracy chooses among every category of the reference, also where --categories or --max_samples keep only
    # some (among the drawn ones alone, its accuracy and chance line would depend on the draw)
    classes = shard_set(opts.reference_shards, opts.reference_split, opts.reference_field).categories if (
        opts.categories and opts.reference_shards) else list(reference.categories)
    if opts.categories:  # every set cut as the reference is (scored against a reference of other categories before)
        reference, sets = of_categories(reference, opts.categories), [of_categories(s, opts.categories) for s in sets]
    if opts.max_samples:
        drawn = drawn_samples(reference, opts.max_samples, opts.seed)
        reference, sets = of_samples(reference, drawn), [of_samples(s, drawn) for s in sets]
    state = distributed_state(opts.ddp_timeout)
    check_shared_folder(state, opts.output_dir)
    report = run_fid(opts, sets, reference, state, classes)
    if report is not None:
        for name, result in report["sets"].items():
            parts = []
            if "fid" in result:
                fid = "—" if result["fid"] is None else f"{result['fid']:.3f}"
                if result.get("fid_ci95"):
                    fid += f" [{result['fid_ci95'][0]:.3f}, {result['fid_ci95'][1]:.3f}]"
                kid = "—" if result.get("kid") is None else (f"{1e3 * result['kid']:.2f} [{1e3 * result['kid_ci95'][0]:.2f}, "
                                                             f"{1e3 * result['kid_ci95'][1]:.2f}]")
                parts.append(f"FID {fid}  KID x10^3 {kid}")  # as report.md and the README write it
            for key, label, _, _ in BEYOND_INCEPTION:
                if result.get(key) is not None:
                    ci = result.get(f"{key}_ci95")
                    given = ci and ci[0] == ci[0]  # [nan, nan]: none to be had (one image)
                    parts.append(f"{label} {result[key]:.4f} " + (f"[{ci[0]:.4f}, {ci[1]:.4f}]" if given else "(no interval)"))
            print(f"{name}: {'  '.join(parts)}  ({result['n_generated']} vs {report['reference']['n']} images; {result['path']})")
            if result.get("warning"):
                print(f"warning: {result['warning']}")
            if result.get("fid_ci95_reason"):
                print(f"FID interval: {result['fid_ci95_reason']}")
            if name in report.get("style_content", {}):
                print(f"  style and content: {report['style_content'][name]['answer']}")
        if report.get("transparent_images"):
            print(f"note: transparent images composited on white (pytorch-fid would make them black): "
                  f"{', '.join(f'{label} ({n})' for label, n in report['transparent_images'].items())}")
        for d in report.get("differences", []):
            low, high = d["kid_difference_ci95"]
            print(f"KID({d['a']}) - KID({d['b']}) x10^3: {1e3 * d['kid_difference']:+.2f} [{1e3 * low:+.2f}, {1e3 * high:+.2f}] "
                  f"{d['verdict']}")
        for d in report.get("style_differences", []):
            ci = d["sketchiness_difference_ci95"]
            print(f"sketchiness({d['a']}) - sketchiness({d['b']}): {d['sketchiness_difference']:+.3f} "
                  + (f"[{ci[0]:+.3f}, {ci[1]:+.3f}] {d['verdict']}" if ci else "(no interval)"))
        print(f"report: {opts.output_dir}/report.md")
    return 0


if __name__ == "__main__":
    run_main(main)
