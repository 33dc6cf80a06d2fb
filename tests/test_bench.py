"""bench/gpu_speed.py runs on CPU at `--size tiny` (its figures mean nothing there; what it prints must hold)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .helpers import REPO


def test_the_gpu_speed_bench_runs_its_rows_and_says_why_it_skips_the_others(tmp_path):
    results = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_speed.py"), "--size", "tiny", "--work_dir", tmp_path,
                           "--only", "defaults", "--only", "diffusers", "--only", "fp16", "--rounds", "2",
                           "--results", results],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {line.split(" | ")[0].strip("| "): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    ran = [r for r in rows if "ms_per_step" in r]
    defaults = "DreamBooth full UNet, bf16, batch 4 (defaults: latents cached)"
    assert [(r["row"], r["round"]) for r in ran] == [(defaults, 0), (defaults, 1)]  # alternating rounds
    for ours in ran:
        assert ours["ms_per_step"] > 0 and ours["images_per_second"] == 1000 * 4 / ours["ms_per_step"]
        assert ours["method"] == "steady after step 2" and ours["host_reads"] == 3  # steps 2, 4, 6
        assert ours["tflop_per_image"] > 0 and ours["chip_share"] is None  # no known peak on a CPU
    median = sorted(r["ms_per_step"] for r in ran)[0]  # of two: the lower
    assert f"| {median:.1f} |" in table[defaults] and "median of 2 rounds" in table[defaults]
    assert "skipped: no --diffusers_dir" in table["diffusers train_dreambooth.py, bf16, batch 4"]
    assert "skipped: fp16 needs CUDA" in table["Textual Inversion, fp16, batch 4"]
    assert "DreamBooth full UNet, bf16, batch 32" not in table  # not asked for by --only
