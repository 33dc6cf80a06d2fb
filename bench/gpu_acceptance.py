"""GPU acceptance: every trainer for a few steps on a full-size SD 1.5-architecture model (random weights, built
offline), in bf16 and fp16, with SDPA and xformers attention, on one CUDA GPU; prints a table.

    bash bench/gpu_acceptance.sh [--steps 6] [--resolution 512] [--work_dir /tmp/s2r-gpu]

A run passes when it exits 0 with a finite loss and its output loads in plain diffusers. xformers rows are
skipped, with the reason, when no xformers built for this torch is installed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRAINERS = {
    "dreambooth (UNet)": ("train/dreambooth.py", ["--instance_category", "cat", "--gradient_checkpointing"]),
    "dreambooth (UNet + text encoder)": ("train/dreambooth.py", ["--instance_category", "cat", "--train_text_encoder",
                                                                 "--gradient_checkpointing"]),
    "dreambooth (LoRA r=8)": ("train/dreambooth.py", ["--instance_category", "cat", "--lora_rank", "8", "--learning_rate", "1e-4"]),
    "dreambooth (prior preservation)": ("train/dreambooth.py", ["--instance_category", "cat", "--with_prior_preservation",
                                                                "--class_prompt", "a sketch of a cat", "--num_class_images", "2",
                                                                "--class_inference_steps", "2", "--gradient_checkpointing"]),
    "sequential dreambooth (2 stages)": ("train/dreambooth_sequential.py", ["--stages", "cat,apple", "--gradient_checkpointing"]),
    "textual inversion": ("train/textual_inversion.py", ["--learning_rate", "5e-4"]),
    "controlnet": ("train/controlnet.py", ["--gradient_checkpointing"]),
}
# SDXL in fp16 with SDXL's own VAE (force_upcast: kept fp32, or it overflows to NaN) and TI in fp16 (its rows train
# in fp32 under GradScaler): the rows that confirm on a GPU what a CPU cannot run.
SDXL_TRAINERS = {
    "sdxl dreambooth (LoRA r=8)": ("train/dreambooth.py", ["--instance_category", "cat", "--lora_rank", "8",
                                                           "--learning_rate", "1e-4", "--gradient_checkpointing"]),
    "sdxl textual inversion": ("train/textual_inversion.py", ["--learning_rate", "5e-4", "--gradient_checkpointing"]),
}


def xformers_status() -> str:
    """'' when xformers' CUDA kernels work with this torch, else why not."""
    try:
        import torch
        import xformers.ops

        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
        return ""
    except Exception as err:  # not installed, or built for another torch
        return f"xformers unavailable: {str(err).strip().splitlines()[0][:80]}"


def prepare(work: Path, resolution: int, size: str) -> tuple[Path, Path]:
    from sketch2real.shards import write_shards
    from sketch2real.sketchy import SketchyRelease
    from sketch2real.splits import build_splits, write_splits
    from sketch2real.synthetic import make_synthetic_sketchy
    from sketch2real.testing.tiny import build_sd

    model = work / f"{size}-random"
    if not (model / "model_index.json").is_file():
        print(f"building the {size} architecture with random weights (sd15: UNet 860M, CLIP ViT-L/14, SD VAE) ...", flush=True)
        build_sd(model, size)
    shards = work / f"shards-{resolution}"
    if not (shards / "train.json").is_file():
        make_synthetic_sketchy(work / "sketchy", categories=["cat", "apple"], photos_per_category=8, sketches_per_photo=2,
                               size=resolution)
        write_splits(build_splits(SketchyRelease(work / "sketchy")), work / "splits")
        write_shards(work / "splits", work / "sketchy", shards, progress=False)
    return model, shards


def check_output(name: str, out: Path) -> None:
    """The saved result loads in plain diffusers."""
    from diffusers import ControlNetModel, StableDiffusionPipeline

    if "controlnet" in name:
        ControlNetModel.from_pretrained(out)
    elif "LoRA" in name:
        assert (out / "pytorch_lora_weights.safetensors").is_file()
    elif "textual" in name:
        assert (out / "learned_embeds.safetensors").is_file()
    elif "sequential" in name:
        StableDiffusionPipeline.from_pretrained(out / "stage-02-apple")
    else:
        StableDiffusionPipeline.from_pretrained(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--work_dir", default="/tmp/s2r-gpu")
    parser.add_argument("--only", default="", help="run only trainers whose name contains this")
    parser.add_argument("--size", default="sd15", help="sd15 (the acceptance), or sd15_small to try the script on CPU")
    parser.add_argument("--skip_sdxl", action="store_true", help="leave out the SDXL fp16 rows (full SDXL architecture)")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and args.size == "sd15":
        print("gpu_acceptance: no CUDA device (--size sd15_small tries the script on CPU)", file=sys.stderr)
        return 2
    work = Path(args.work_dir)
    model, shards = prepare(work, args.resolution, args.size)
    xformers_skip = xformers_status() if cuda else "needs CUDA"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows, failures = [], 0
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'} | torch {torch.__version__} | {args.size} architecture, random weights | "
          f"{args.resolution} px, batch 1, {args.steps} steps", flush=True)
    runs = [(name, script, extra, model) for name, (script, extra) in TRAINERS.items()]
    if cuda and not args.skip_sdxl:
        sdxl, _ = prepare(work, args.resolution, "sdxl")
        runs += [(name, script, extra, sdxl) for name, (script, extra) in SDXL_TRAINERS.items()]
    for name, script, extra, model in runs:
        if args.only and args.only not in name:
            continue
        for precision in ("bf16", "fp16"):
            for attention in ("sdpa", "xformers"):
                label = f"{name} | {precision} | {attention}"
                if attention == "xformers" and xformers_skip:
                    rows.append((label, "skipped", "", "", "", xformers_skip))
                    continue
                if precision == "fp16" and not cuda:
                    rows.append((label, "skipped", "", "", "", "needs CUDA"))
                    continue
                out = work / "runs" / f"{script.split('/')[-1][:-3]}-{abs(hash(label)) % 10**8}"
                cmd = [sys.executable, str(REPO / script), "--pretrained_model_name_or_path", model, "--shard_dir", shards,
                       "--output_dir", out, "--resolution", args.resolution, "--train_batch_size", "1",
                       "--mixed_precision", precision, "--validation_steps", "0", "--checkpointing_steps", "0",
                       "--num_heldout_samples", "0", "--report_to", "none", *extra]
                cmd += ["--steps_per_stage", args.steps] if "sequential" in name else ["--max_train_steps", args.steps]
                if "prior" in name:
                    cmd += ["--class_data_dir", out / "class"]
                if attention == "xformers":
                    cmd.append("--enable_xformers_memory_efficient_attention")
                start = time.perf_counter()
                proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
                wall = time.perf_counter() - start
                metrics_file = out / ("stage-02-apple" if "sequential" in name else "") / "metrics.json"
                if proc.returncode != 0 or not metrics_file.is_file():
                    failures += 1
                    last = (proc.stderr.strip().splitlines() or ["?"])[-1][:100]
                    rows.append((label, "FAIL", "", "", f"{wall:.0f}", last))
                    print(f"FAIL {label}\n{proc.stderr[-3000:]}", flush=True)
                    continue
                m = json.loads(metrics_file.read_text())
                finite = m["final_loss"] is not None and math.isfinite(m["final_loss"])  # null: NaN
                fp32_training = m.get("optimizer_dtypes", {}).get("state") in (["torch.float32"], [])
                vae = m.get("latent_cache", {}).get("vae_dtype", "")
                if not fp32_training or (precision == "fp16" and "sdxl" in name and vae != "torch.float32"):
                    finite = False
                    print(f"FAIL {label}: optimizer {m.get('optimizer_dtypes')}, VAE {vae}", flush=True)
                try:
                    check_output(name, out)
                    loads = "loads"
                except Exception as err:
                    loads, finite = f"does not load: {err}", False
                failures += not finite
                rows.append((label, "ok" if finite else "FAIL", f"{m['final_loss']:.4f}", f"{m['peak_memory_mb'] / 1024:.1f}",
                             f"{m['steps_per_second']:.2f}", loads))
                print(" | ".join(rows[-1]), flush=True)
    print(f"\n| trainer | precision | attention | result | final loss | peak {'GPU' if cuda else 'RSS'} GiB | steps/s | notes |")
    print("|---|---|---|---|---:|---:|---:|---|")
    for label, result, loss, memory, speed, note in rows:
        print(f"| {label} | {result} | {loss} | {memory} | {speed} | {note} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
