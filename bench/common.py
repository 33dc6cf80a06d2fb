"""Fixtures for benchmarks: tiny models, a synthetic release, its splits and shards in one temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare(root: Path, photos_per_category: int = 8) -> dict[str, Path]:
    from sketch2real.shards import write_shards
    from sketch2real.sketchy import SketchyRelease
    from sketch2real.splits import build_splits, write_splits
    from sketch2real.synthetic import make_synthetic_sketchy
    from sketch2real.tiny import build_all

    models = build_all(root / "tiny")
    os.environ["TORCH_HOME"] = str(models.torch_home)
    make_synthetic_sketchy(root / "sketchy", photos_per_category=photos_per_category, size=64)
    write_splits(build_splits(SketchyRelease(root / "sketchy")), root / "splits")
    write_shards(root / "splits", root / "sketchy", root / "shards", progress=False)
    return {"sd": models.sd, "blip2": models.blip2, "llava": models.llava, "shards": root / "shards"}


def run(script: str, *args, launch_processes: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if launch_processes:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs/cpu.yaml"),
               "--num_processes", str(launch_processes), str(REPO / script)]
    else:
        cmd = [sys.executable, str(REPO / script)]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env, check=True)
