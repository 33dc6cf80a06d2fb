"""Peak memory of one training step of each trainer at full size (SD 1.5's architecture, random weights) with the
memory recipes, bf16, batch 1, 256 px by default. On CPU it is the process's peak RSS; on CUDA, peak allocated.

    python bench/memory_full_size.py [--resolution 256] [--work_dir /tmp/s2r-mem] [--size sdxl] [--only LoRA]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from gpu_acceptance import REPO, prepare

RUNS = {
    "DreamBooth, UNet, AdamW": ("train/dreambooth.py", []),
    "DreamBooth, UNet, 8-bit AdamW + gradient checkpointing": ("train/dreambooth.py", ["--use_8bit_adam", "--gradient_checkpointing"]),
    "DreamBooth, UNet + text encoder, 8-bit AdamW + checkpointing": ("train/dreambooth.py", ["--train_text_encoder", "--use_8bit_adam",
                                                                                         "--gradient_checkpointing"]),
    "DreamBooth, LoRA r=8": ("train/dreambooth.py", ["--lora_rank", "8"]),
    "DreamBooth, LoRA r=8 + gradient checkpointing": ("train/dreambooth.py", ["--lora_rank", "8", "--gradient_checkpointing"]),
    "Textual Inversion": ("train/textual_inversion.py", []),
    "ControlNet, 8-bit AdamW + gradient checkpointing": ("train/controlnet.py", ["--use_8bit_adam", "--gradient_checkpointing"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--work_dir", default="/tmp/s2r-mem")
    parser.add_argument("--size", default="sd15", help="sd15 or sdxl (python -m sketch2real.testing.build --size)")
    parser.add_argument("--only", nargs="*", default=[], help="run only the recipes whose name contains one of these")
    args = parser.parse_args()
    work = Path(args.work_dir)
    model, shards = prepare(work, args.resolution, args.size)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"{args.size} architecture, random weights, bf16, batch 1, {args.resolution} px, 1 step")
    print("| trainer and recipe | peak memory GiB | s/step |\n|---|---:|---:|")
    for name, (script, extra) in RUNS.items():
        if args.only and not any(word in name for word in args.only):
            continue
        out = work / "runs" / name.split(",")[0].replace(" ", "_") / str(abs(hash(name)) % 10**6)
        cmd = [sys.executable, REPO / script, "--pretrained_model_name_or_path", model, "--shard_dir", shards, "--output_dir", out,
               "--resolution", args.resolution, "--train_batch_size", "1", "--max_train_steps", "1", "--mixed_precision", "bf16",
               "--validation_steps", "0", "--checkpointing_steps", "0", "--num_heldout_samples", "0", "--report_to", "none",
               *(["--instance_category", "cat"] if "dreambooth" in script else []), *extra]
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"| {name} | failed: {proc.stderr.strip().splitlines()[-1][:80]} | |", flush=True)
            continue
        m = json.loads((out / "metrics.json").read_text())
        print(f"| {name} | {m['peak_memory_mb'] / 1024:.1f} | {1 / m['steps_per_second']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
