"""The FID job against `python -m pytorch_fid`, side by side in one run: the study's workload, several generated
sets scored against one reference at 2048 dims. Prints wall times, the ratio, and both tools' values per set.

    python bench/fid_speed.py [--sets 4] [--images 125] [--dims 2048] [--device cpu|cuda] [--repeats 1]

pytorch-fid scores one pair of folders per call, so a user runs it once per set (the reference is extracted
every time); eval/fid.py extracts the reference once and scores every set (plus KID) in one job.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_sets(root: Path, sets: int, images: int) -> tuple[Path, list[Path]]:
    """A reference folder of photos and `sets` folders of other images (sketch k of each photo), 256 px."""
    from sketch2real.sketchy import SketchyRelease
    from sketch2real.synthetic import make_synthetic_sketchy

    categories = ["airplane", "apple", "cat", "car_(sedan)", "hot-air_balloon"]
    per_category = -(-images // len(categories))
    make_synthetic_sketchy(root / "sketchy", categories=categories, photos_per_category=per_category,
                           sketches_per_photo=sets, test_photos_per_category=0, size=256)
    release = SketchyRelease(root / "sketchy")
    reference, generated = root / "reference", [root / f"set{i}" for i in range(sets)]
    for folder in (reference, *generated):
        folder.mkdir()
    by_photo: dict[str, list[str]] = {}
    for record in release.sketches():
        by_photo.setdefault(record.photo_path, []).append(record.sketch_path)
    for i, (photo, sketches) in enumerate(sorted(by_photo.items())[:images]):
        (reference / f"{i:05d}{Path(photo).suffix}").symlink_to(release.root / photo)
        for k, sketch in enumerate(sorted(sketches)[:sets]):
            (generated[k] / f"{i:05d}.png").symlink_to(release.root / sketch)
    return reference, generated


def timed(cmd: list, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=4)
    parser.add_argument("--images", type=int, default=125)
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--channels_last", action="store_true", help="also time eval/fid.py --channels_last")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "TORCH_HOME" not in env:  # offline: a valid random pytorch-fid Inception file, for both tools
            from sketch2real.testing.tiny import write_fid_inception_weights

            write_fid_inception_weights(tmp / "torch_home")
            env["TORCH_HOME"] = str(tmp / "torch_home")
        reference, generated = make_sets(tmp, args.sets, args.images)
        ours_cmd = [sys.executable, REPO / "eval/fid.py", "--reference_dir", reference, "--dims", args.dims, "--no_cache",
                    "--batch_size", args.batch_size, "--output_dir", tmp / "ours", "--generated",
                    *[f"{g.name}={g}" for g in generated]]
        ours_times, fast_times, theirs_times, theirs_values, fast_values = [], [], [], {}, {}
        for _ in range(args.repeats):  # alternating: ours, then pytorch-fid once per set
            ours_times.append(timed(ours_cmd, env)[0])
            ours_values = {n: r["fid"] for n, r in json.loads((tmp / "ours" / "metrics.json").read_text())["sets"].items()}
            if args.channels_last:
                fast_times.append(timed([*ours_cmd, "--channels_last"], env)[0])
                fast_values = {n: r["fid"] for n, r in json.loads((tmp / "ours" / "metrics.json").read_text())["sets"].items()}
            total = 0.0
            for g in generated:
                seconds, proc = timed([sys.executable, "-m", "pytorch_fid", g, reference, "--dims", args.dims, "--device",
                                       args.device, "--batch-size", args.batch_size, "--num-workers", "2"], env)
                total += seconds
                theirs_values[g.name] = float(re.search(r"FID:\s+([0-9.eE+-]+)", proc.stdout)[1])
            theirs_times.append(total)
    ours_s, theirs_s = min(ours_times), min(theirs_times)
    print(f"{args.sets} generated sets x {args.images} images vs one reference of {args.images}, {args.dims} dims, "
          f"{args.device}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'all')}, best of {args.repeats}")
    print("| tool | wall s | speed vs pytorch-fid |\n|---|---:|---:|")
    print(f"| `python -m pytorch_fid`, once per set | {theirs_s:.1f} | 1.00x |")
    print(f"| `eval/fid.py`, one job (+ KID) | {ours_s:.1f} | {theirs_s / ours_s:.2f}x |")
    if fast_times:
        print(f"| `eval/fid.py --channels_last` | {min(fast_times):.1f} | {theirs_s / min(fast_times):.2f}x |")
    print("\n| set | pytorch-fid | eval/fid.py | relative difference | --channels_last | relative difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, theirs in theirs_values.items():
        fast = fast_values.get(name)
        fast_cells = f"{fast:.6f} | {abs(fast - theirs) / abs(theirs):.1e}" if fast is not None else "— | —"
        print(f"| {name} | {theirs:.6f} | {ours_values[name]:.6f} | {abs(ours_values[name] - theirs) / abs(theirs):.1e} | "
              f"{fast_cells} |")


if __name__ == "__main__":
    main()
