"""Our trainers against diffusers' example scripts, side by side in one run: CPU time per optimizer step and
wall time of a short run, same model, data and settings; ours with the defaults a user gets, theirs with theirs.

    python bench/compare_diffusers.py --diffusers_dir PATH [--size tiny|sd15_small] [--resolution 64] [--pairs 2]

PATH is a huggingface/diffusers checkout (its examples/ folder is run from there; nothing is copied into this
project). Per-step cost = (CPU time of a long run - CPU time of a short run) / (step difference): start-up,
model loading and saving cancel out. Runs alternate ours / theirs; the best of --pairs is kept.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds_of(cmd: list, env: dict) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of a child process run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr[-4000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def commands(diffusers: Path, model: Path, images: Path, out: Path, resolution: int, batch: int) -> dict:
    """Per workload: (ours, theirs) command builders taking (steps, output folder)."""
    py = sys.executable
    shared = ["--pretrained_model_name_or_path", model, "--resolution", resolution, "--train_batch_size", batch, "--seed", "0"]
    prior = ["--with_prior_preservation", "--class_data_dir", images, "--class_prompt", "a sketch of a cat",
             "--num_class_images", len(list(images.iterdir()))]
    return {
        "DreamBooth": (
            lambda n, o: [py, REPO / "train/dreambooth.py", *shared, "--instance_data_dir", images, "--instance_prompt",
                          "a sks sketch of a cat", "--max_train_steps", n, "--output_dir", o, "--validation_steps", "0"],
            lambda n, o: [py, diffusers / "examples/dreambooth/train_dreambooth.py", *shared, "--instance_data_dir", images,
                          "--instance_prompt", "a sks sketch of a cat", "--max_train_steps", n, "--output_dir", o],
        ),
        # class images already there (the images themselves): neither script generates any inside the clock
        "DreamBooth, prior preservation": (
            lambda n, o: [py, REPO / "train/dreambooth.py", *shared, "--instance_data_dir", images, "--instance_prompt",
                          "a sks sketch of a cat", "--max_train_steps", n, "--output_dir", o, "--validation_steps", "0",
                          *prior],
            lambda n, o: [py, diffusers / "examples/dreambooth/train_dreambooth.py", *shared, "--instance_data_dir", images,
                          "--instance_prompt", "a sks sketch of a cat", "--max_train_steps", n, "--output_dir", o, *prior],
        ),
        "Textual Inversion": (
            lambda n, o: [py, REPO / "train/textual_inversion.py", *shared, "--train_data_dir", images, "--placeholder_token",
                          "<sketch>", "--initializer_token", "sketch", "--max_train_steps", n, "--output_dir", o,
                          "--validation_steps", "0"],
            lambda n, o: [py, diffusers / "examples/textual_inversion/textual_inversion.py", *shared, "--train_data_dir", images,
                          "--placeholder_token", "<sketch>", "--initializer_token", "sketch", "--learnable_property", "style",
                          "--max_train_steps", n, "--output_dir", o],
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers_dir", required=True, help="a huggingface/diffusers checkout (has examples/)")
    parser.add_argument("--size", default="tiny", choices=("tiny", "sd15_small"),
                        help="tiny, or sd15_small (SD 1.5's block structure at reduced width)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=110)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--only", default="", help="run only workloads whose name contains this")
    args = parser.parse_args()
    diffusers = Path(args.diffusers_dir)
    if not (diffusers / "examples/dreambooth/train_dreambooth.py").is_file():
        raise SystemExit(f"{diffusers} is not a diffusers checkout (no examples/dreambooth/train_dreambooth.py)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from sketch2real.synthetic import make_synthetic_sketchy
        from sketch2real.testing.tiny import build_sd

        model = build_sd(tmp / "model", args.size)
        make_synthetic_sketchy(tmp / "sketchy", categories=["cat"], photos_per_category=5, sketches_per_photo=3,
                               test_photos_per_category=0, size=args.resolution)
        images = tmp / "sketchy/256x256/sketch/tx_000000000000/cat"
        rows = []
        for name, (ours, theirs) in commands(diffusers, model, images, tmp, args.resolution, args.batch_size).items():
            if args.only and args.only not in name:
                continue
            best: dict[str, list[float]] = {"ours": [], "theirs": []}
            walls: dict[str, list[float]] = {"ours": [], "theirs": []}
            workload = "".join(c if c.isalnum() else "_" for c in name.lower())
            for pair in range(args.pairs):
                for who, build in (("ours", ours), ("theirs", theirs)):
                    # a folder per run: a trainer refuses another trainer's finished folder, and a workload must
                    # not start from another's latent cache
                    runs = tmp / "runs" / workload
                    short_cpu, short_wall = cpu_seconds_of(build(args.short, runs / f"{who}-{pair}-s"), env)
                    long_cpu, _ = cpu_seconds_of(build(args.long, runs / f"{who}-{pair}-l"), env)
                    best[who].append((long_cpu - short_cpu) / (args.long - args.short))
                    walls[who].append(short_wall)
            o, t = min(best["ours"]), min(best["theirs"])
            rows.append((name, o, t, min(walls["ours"]), min(walls["theirs"])))
            print(f"{name}: ours {o * 1000:.1f} ms/step, diffusers {t * 1000:.1f} ms/step", flush=True)
    print(f"\n{args.size} SD, {args.resolution} px, batch {args.batch_size}, CPU time per step = "
          f"(CPU of {args.long} steps - CPU of {args.short}) / {args.long - args.short}, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, best of {args.pairs}")
    print(f"| workload | ours ms/step | diffusers ms/step | ours / reference speed | wall of {args.short} steps: ours | diffusers |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, o, t, wo, wt in rows:
        print(f"| {name} | {o * 1000:.1f} | {t * 1000:.1f} | {t / o:.2f}x | {wo:.1f} s | {wt:.1f} s |")


if __name__ == "__main__":
    main()
