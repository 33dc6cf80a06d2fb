"""Session fixtures: tiny models, a synthetic Sketchy release, its splits and shards (built once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_BUILD_OPS", "0")

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, env: dict | None = None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a repo script as a user would, capturing output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from sketch2real.tiny import build_all

    out = tmp_path_factory.mktemp("tiny")
    models = build_all(out)
    os.environ["TORCH_HOME"] = str(models.torch_home)
    return models


@pytest.fixture(scope="session")
def sketchy_root(tmp_path_factory) -> Path:
    from sketch2real.synthetic import make_synthetic_sketchy

    root = tmp_path_factory.mktemp("sketchy")
    make_synthetic_sketchy(root, photos_per_category=8, sketches_per_photo=3, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def splits_dir(sketchy_root, tmp_path_factory) -> Path:
    from sketch2real.sketchy import SketchyRelease
    from sketch2real.splits import build_splits, write_splits

    out = tmp_path_factory.mktemp("splits")
    write_splits(build_splits(SketchyRelease(sketchy_root), seed=0), out)
    return out


@pytest.fixture(scope="session")
def shard_dir(splits_dir, sketchy_root, tmp_path_factory) -> Path:
    from sketch2real.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(splits_dir, sketchy_root, out, max_samples=16, progress=False)
    return out
