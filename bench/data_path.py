"""Does the data path keep up with the step? Images/s per DataLoader worker at 512 px, and the ControlNet
trainer's step time with image decoding on the critical path (0 workers) and ahead of the step (workers).

Builds a synthetic release at Sketchy's 256 px, its splits and shards in a temp dir, then
1. decodes + resizes this rank's rows of consecutive global batches (`StepLoader`, the trainers' loader) of
   sketches and photos at --resolution with 0, 1, .. --max_workers workers: images/s and images/s per worker;
2. runs train/controlnet.py on the tiny model at --resolution with --dataloader_num_workers 0 and N, with and
   without --cache_latents: steps/s from metrics.json (start-up excluded).
On a GPU node, run it with the real model (--pretrained_model_name_or_path) to see the loader against a real step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run  # noqa: E402


def decode_rates(shards: Path, resolution: int, batch: int, batches: int, max_workers: int) -> list[tuple[int, float]]:
    from sketch2real.shards import ShardSamples
    from sketch2real.training.data import GlobalBatchSampler, LazyImages, StepLoader

    rows = []
    for workers in range(max_workers + 1):
        images = 0
        start = time.perf_counter()
        for field in ("sketch", "photo"):
            samples = ShardSamples(shards, "train", fields=(field,), resolution=resolution)
            source = LazyImages(samples, field, list(range(len(samples))))
            sampler = GlobalBatchSampler(len(samples), batch, 1, 0, 1, seed=0)
            loader = StepLoader(source, sampler, batches, workers, pin_memory=False)
            for step in range(batches):
                images += loader.batch(step, 0).shape[0]
            loader.close()
        rows.append((workers, images / (time.perf_counter() - start)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=40, help="global batches decoded per field in part 1")
    parser.add_argument("--max_workers", type=int, default=2)
    parser.add_argument("--train_resolution", type=int, default=128, help="resolution of the trainer runs")
    parser.add_argument("--max_train_steps", type=int, default=30)
    parser.add_argument("--train_workers", type=int, default=1, help="workers of the trainer run off the critical path")
    parser.add_argument("--pretrained_model_name_or_path", default="", help="default: the tiny model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from sketch2real.shards import write_shards
        from sketch2real.sketchy import SketchyRelease
        from sketch2real.splits import build_splits, write_splits
        from sketch2real.synthetic import make_synthetic_sketchy
        from sketch2real.testing.tiny import build_all

        root = Path(tmp)
        models = build_all(root / "tiny")
        make_synthetic_sketchy(root / "sketchy", photos_per_category=8, sketches_per_photo=2, size=256)
        write_splits(build_splits(SketchyRelease(root / "sketchy")), root / "splits")
        write_shards(root / "splits", root / "sketchy", root / "shards", progress=False)

        print(f"## Decoding + resizing to {args.resolution} px (StepLoader, batches of {args.train_batch_size})\n")
        print("| workers | images/s | images/s per worker |\n|---|---|---|")
        for workers, rate in decode_rates(root / "shards", args.resolution, args.train_batch_size, args.batches, args.max_workers):
            print(f"| {workers} | {rate:.1f} | {rate / max(workers, 1):.1f} |")

        model = args.pretrained_model_name_or_path or str(models.sd)
        print(f"\n## ControlNet step time at {args.train_resolution} px, batch {args.train_batch_size} ({Path(model).name})\n")
        print("| latents | loader | s/step | waiting for images, s/step |\n|---|---|---|---|")
        for cache in ("false", "true"):
            for workers in (0, args.train_workers):
                out = root / f"cn-{cache}-{workers}"
                run("train/controlnet.py", "--pretrained_model_name_or_path", model, "--shard_dir", root / "shards",
                    "--output_dir", out, "--resolution", args.train_resolution, "--train_batch_size", args.train_batch_size,
                    "--max_train_steps", args.max_train_steps, "--validation_steps", "0", "--checkpointing_steps", "0",
                    "--num_heldout_samples", "0", "--report_to", "none", "--cache_latents", cache,
                    "--dataloader_num_workers", workers)
                metrics = json.loads((out / "metrics.json").read_text())
                where = "on the critical path (0 workers)" if workers == 0 else f"ahead of the step ({workers} workers)"
                print(f"| {'cached' if cache == 'true' else 'encoded every step'} | {where} | "
                      f"{1 / metrics['steps_per_second']:.4f} | {metrics['data_wait_seconds_per_step']:.4f} |")


if __name__ == "__main__":
    main()
