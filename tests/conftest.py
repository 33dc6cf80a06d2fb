"""Session fixtures: tiny models, a synthetic Sketchy release, its splits and shards (built once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_BUILD_OPS", "0")

from .helpers import REPO  # noqa: F401  (fixtures below use it)

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)  # two test workers on two cores: oversubscribed threads run many times slower

# The Slurm chains are the suite's longest files, and a one-process chain leaves a core idle between and inside its
# jobs: they go first (one to each worker), so that the other files fill those gaps, rather than a chain running alone
# at the end. xdist hands out files in collection order only with --no-loadscope-reorder (the Makefile's); by
# default it sorts them by their number of tests, which put these few-test files last.
FIRST = ("test_slurm.py", "test_two_nodes.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow: README commands that take 10+ minutes alone (make demo)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: the rest keep their order
    if not config.getoption("--run-slow"):
        skip = pytest.mark.skip(reason="slow: a README command of 10+ minutes, run alone with --run-slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from sketch2real.testing.tiny import build_all

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
