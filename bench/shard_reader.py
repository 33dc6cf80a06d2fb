"""Images/s of the shard reader against reading the same images from the raw release folders.

Builds a synthetic release (default 10 categories x 20 photos x 5 sketches at 256 px),
its splits and shards in a temp dir, then decodes every train sketch+photo pair
at --resolution both ways. Prints images/s and peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from sketch2real.io import read_jsonl
from sketch2real.shards import ShardStream, decode_image, stream_loader, write_shards
from sketch2real.sketchy import CATEGORIES, SketchyRelease
from sketch2real.splits import build_splits, write_splits
from sketch2real.synthetic import make_synthetic_sketchy


class FolderPairs(torch.utils.data.Dataset):
    def __init__(self, root: Path, rows: list[dict], resolution: int):
        self.root, self.rows, self.resolution = root, rows, resolution

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {
            "sketch": decode_image((self.root / row["sketch_path"]).read_bytes(), self.resolution, True),
            "photo": decode_image((self.root / row["photo_path"]).read_bytes(), self.resolution, True),
        }


def _rate(loader, n_images_per_batch_item: int = 2) -> float:
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += batch["sketch"].shape[0] * n_images_per_batch_item
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--photos_per_category", type=int, default=20)
    parser.add_argument("--sketches_per_photo", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_synthetic_sketchy(tmp / "sketchy", CATEGORIES[: args.categories], args.photos_per_category,
                               args.sketches_per_photo, test_photos_per_category=2, size=256)
        write_splits(build_splits(SketchyRelease(tmp / "sketchy")), tmp / "splits")
        write_shards(tmp / "splits", tmp / "sketchy", tmp / "shards", ("train",), max_samples=200, progress=False)
        rows = read_jsonl(tmp / "splits" / "train.jsonl")
        folder = torch.utils.data.DataLoader(FolderPairs(tmp / "sketchy", rows, args.resolution),
                                             batch_size=args.batch_size, num_workers=args.num_workers)
        shards = stream_loader(ShardStream(tmp / "shards", "train", resolution=args.resolution, rank=0, world_size=1),
                               args.batch_size, args.num_workers)
        _rate(shards)  # warm the page cache for both readers alike
        _rate(folder)
        folder_rate, shard_rate = _rate(folder), _rate(shards)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{len(rows)} train pairs at {args.resolution}px, batch {args.batch_size}, {args.num_workers} workers")
    print(f"raw folders : {folder_rate:8.1f} images/s")
    print(f"shards      : {shard_rate:8.1f} images/s")
    print(f"peak RSS (main process): {peak_mb:.0f} MiB")


if __name__ == "__main__":
    main()
