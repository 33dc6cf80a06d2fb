"""Throughput of inference on the tiny models (CPU here): generation images/s at batch 1 and 8 and with
2 processes, captions/s at batch 1 and 8, and FID feature extraction against `python -m pytorch_fid`
on the same 200 images (both FID values printed side by side).

    python bench/infer_speed.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import prepare, run
from PIL import Image


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare(tmp, photos_per_category=8)
        gen = ["--pretrained_model_name_or_path", data["sd"], "--shard_dir", data["shards"], "--split", "train",
               "--prompt_template", "a photo of a {category}", "--height", "64", "--width", "64", "--num_inference_steps", "10"]
        print("generation (tiny SD, 64 px, 10 steps; includes ~8 s of start-up per run):")
        for label, extra, procs in [("batch 1", ["--batch_size", "1"], 0), ("batch 8", ["--batch_size", "8"], 0),
                                    ("batch 8, 2 processes", ["--batch_size", "8"], 2)]:
            out = tmp / f"gen_{label.replace(' ', '_').replace(',', '')}"
            seconds = timed(lambda out=out, extra=extra, procs=procs: run("infer/generate.py", *gen, *extra, "--output_dir", out,
                                                                          launch_processes=procs))
            count = len(list((out / "images").rglob("*.png")))
            print(f"  {label:24s} {count / seconds:7.2f} images/s ({count} images in {seconds:.1f} s)")
        print("captioning (tiny models, 20 new tokens, prompt 1):")
        for family in ("blip2", "llava"):
            for batch in (1, 8):
                out = tmp / f"cap_{family}_{batch}"
                seconds = timed(lambda out=out, family=family, batch=batch: run(
                    "infer/caption.py", "--model_name_or_path", data[family], "--shard_dir", data["shards"], "--split", "train",
                    "--prompts", "1", "--batch_size", batch, "--max_new_tokens", "20", "--output_dir", out))
                count = len((out / "captions.jsonl").read_text().splitlines())
                print(f"  {family:6s} batch {batch}: {count / seconds:7.2f} captions/s ({count} in {seconds:.1f} s)")
        rng = np.random.default_rng(0)
        for name in ("a", "b"):
            (tmp / name).mkdir()
            for i in range(200):
                Image.fromarray((rng.random((64, 64, 3)) * (255 if name == "a" else 160)).astype("uint8")).save(tmp / name / f"{i}.png")
        ours_s = timed(lambda: run("eval/fid.py", "--generated", tmp / "a", "--reference_dir", tmp / "b", "--output_dir",
                                   tmp / "fid", "--no_cache", "--num_workers", "2"))
        ours = json.loads((tmp / "fid" / "metrics.json").read_text())["sets"]["a"]["fid"]
        start = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "pytorch_fid", str(tmp / "a"), str(tmp / "b"), "--device", "cpu",
                              "--num-workers", "2"], capture_output=True, text=True, check=True)
        theirs_s = time.perf_counter() - start
        theirs = float(re.search(r"FID:\s+([0-9.]+)", cli.stdout)[1])
        print("FID, 200 vs 200 images, 2048 dims:")
        print(f"  eval/fid.py          {400 / ours_s:7.2f} images/s  FID {ours:.4f}")
        print(f"  python -m pytorch_fid {400 / theirs_s:6.2f} images/s  FID {theirs:.4f}")


if __name__ == "__main__":
    main()
