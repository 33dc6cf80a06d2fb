"""Steps/s, samples/s, peak memory, model FLOPs per sample and MFU (on a known GPU) of the trainers on the tiny
model at 64 px (CPU here; GPU on a cluster).

    python bench/train_speed.py [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from common import device_peak_flops, prepare, run, training_flops_per_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare(tmp)
        common = ["--pretrained_model_name_or_path", data["sd"], "--shard_dir", data["shards"], "--resolution", "64",
                  "--max_train_steps", args.steps, "--train_batch_size", args.batch_size, "--validation_steps", "0",
                  "--checkpointing_steps", "0", "--report_to", "none", "--num_heldout_samples", "0"]
        runs = {  # name: (script, flags, what trains: `training_flops_per_sample`'s `trains`)
            "dreambooth (full UNet)": ("train/dreambooth.py", ["--instance_category", "cat"], "unet"),
            "dreambooth (LoRA r=4)": ("train/dreambooth.py", ["--instance_category", "cat", "--lora_rank", "4"], "lora"),
            "dreambooth (+ text encoder)": ("train/dreambooth.py", ["--instance_category", "cat", "--train_text_encoder"],
                                            "unet_and_text_encoder"),
            "textual inversion": ("train/textual_inversion.py", [], "embeddings"),
            "controlnet": ("train/controlnet.py", [], "unet"),
        }
        print(f"tiny SD, 64 px, batch {args.batch_size}, {args.steps} steps, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'all')}")
        peak = device_peak_flops()
        print(f"{'run':30s} {'steps/s':>8s} {'samples/s':>10s} {'peak MiB':>9s} {'GFLOP/sample':>13s} {'MFU':>6s}")
        for name, (script, extra, trains) in runs.items():
            out = tmp / name.replace(" ", "_")
            run(script, *common, *extra, "--output_dir", out)
            m = json.loads((out / "metrics.json").read_text())
            flops = training_flops_per_sample(data["sd"], 64, trains, controlnet="controlnet" in name, lora_rank=4)
            mfu = f"{m['samples_per_second'] * flops / peak:6.1%}" if peak else "   n/a"  # no known peak on CPU
            print(f"{name:30s} {m['steps_per_second']:8.2f} {m['samples_per_second']:10.2f} {m['peak_memory_mb']:9.0f} "
                  f"{flops / 1e9:13.3f} {mfu}")


if __name__ == "__main__":
    main()
