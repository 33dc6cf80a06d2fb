"""bench/gpu_speed.py runs on CPU at `--size tiny` (its figures mean nothing there; what it prints must hold)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from .helpers import REPO


def test_the_gpu_speed_bench_runs_its_rows_and_says_why_it_skips_the_others(tmp_path):
    results = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_speed.py"), "--size", "tiny", "--work_dir", tmp_path,
                           "--only", "diffusers", "--only", "defaults", "--only", "ti-fp16", "--only", "flux-lora", "--rounds", "2",
                           "--results", results],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {line.split(" | ")[0].strip("| "): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    ran = [r for r in rows if "ms_per_step" in r]
    defaults = "DreamBooth full UNet, bf16, batch 4 (defaults: latents cached)"
    flux = next(r["row"] for r in rows if r["row"].startswith("FLUX.1 [dev] DreamBooth LoRA r=16"))
    assert [(r["row"], r["round"]) for r in ran] == [(defaults, 0), (flux, 0), (defaults, 1), (flux, 1)]  # alternating
    for ours in ran:
        assert ours["ms_per_step"] > 0 and ours["images_per_second"] == 1000 * ours["batch"] / ours["ms_per_step"]
        assert ours["method"] == "steady after step 2" and ours["host_reads"] == 3  # steps 2, 4, 6
        assert ours["tflop_per_image"] > 0 and ours["chip_share"] is None  # no known peak on a CPU
        assert ours["cache_peak_gib"] > 0  # the peak before training (the latent cache's build), reported apart
    assert [r["batch"] for r in ran] == [4, 1, 4, 1] and "the README's recipe: 23.6 GiB" in table[flux]
    median = sorted(r["ms_per_step"] for r in ran if r["row"] == defaults)[0]  # of two: the lower
    assert f"| {median:.1f} |" in table[defaults] and "median of 2 rounds" in table[defaults]
    assert "skipped: no --diffusers_dir" in table["diffusers train_dreambooth.py, bf16, batch 4"]
    assert "skipped: fp16 needs CUDA" in table["Textual Inversion, fp16, batch 4"]
    assert "DreamBooth full UNet, bf16, batch 32" not in table  # not asked for by --only
    assert [r["row"] for r in rows[:3]] == ["diffusers train_dreambooth.py, bf16, batch 4", defaults,
                                            "Textual Inversion, fp16, batch 4"]  # in --only's order
    assert not list(tmp_path.glob("runs/*/validation"))  # validation off: the reference validates nothing either


def test_the_gpu_speed_bench_refuses_an_unknown_row_and_stops_a_row_at_the_deadline(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_speed.py"), "--size", "tiny", "--only", "fp16"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "no row fp16 (rows: defaults, diffusers," in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_speed.py"), "--size", "tiny", "--diffusers_dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "holds neither examples/dreambooth/train_dreambooth.py" in proc.stderr
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_speed
    finally:
        sys.path.remove(str(REPO / "bench"))
    size = gpu_speed.Size("tiny", 64, 6, 2, (2, 4), {"plain": 0}, {"sd": 0})  # admitted whatever the clock says
    row = gpu_speed.selected_rows("tiny", ["defaults"])[0]
    started = time.perf_counter()
    result = gpu_speed.run_row(row, 0, size, tmp_path, None, dict(os.environ), False, started, deadline=0.5,
                               flops_of=None, peak=None)
    assert result["note"] == "FAILED: stopped at the deadline (0 s)" and "ms_per_step" not in result
    # the ratio to diffusers' script of its round and batch, for a row that ran before the reference in its round (the
    # defaults row, first in every default run, never had one)
    from common import peak_bf16

    names = ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA L40", "NVIDIA L4",
             "NVIDIA L40S", "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-32GB")
    assert [peak_bf16(n) for n in names] == [989e12, 756e12, 835e12, 989e12, 181e12, 121e12, 362e12, 312e12, None]
    selected = gpu_speed.selected_rows("tiny", ["defaults", "diffusers", "lora-bf16"])
    defaults, reference, lora = (r.name for r in selected)
    results = [{"row": row, "round": round_, "batch": 4, "ms_per_step": ms, "images_per_second": 4000 / ms, "method": ""}
               for row, round_, ms in ((defaults, 0, 50.0), (reference, 0, 150.0), (lora, 0, 30.0), (defaults, 1, 60.0))]
    gpu_speed.fill_reference_ratios(results, selected)
    assert results[0]["vs_diffusers"] == 3.0 and "vs_diffusers" not in results[3]  # round 1 has no reference run
    assert "vs_diffusers" not in results[2]  # LoRA trains other weights than the reference: no ratio
    assert "| 3.00x |" in gpu_speed.table_line(defaults, [results[0], results[3]])


def test_counting_flux_flops_leaves_the_process_able_to_count_again_and_to_train(tiny_models):
    """The count runs FLUX.1's `predict` on fake tensors: its cached position ids must not outlive it (a fake one kept
    failed the next real step, and the next count)."""
    import torch

    from sketch2real.family import FAMILIES, Conditioning
    from sketch2real.models import load_sd_components

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from common import flow_lora_flops_per_sample
    finally:
        sys.path.remove(str(REPO / "bench"))
    first = flow_lora_flops_per_sample(tiny_models.flux, 64)
    assert first > 0 and flow_lora_flops_per_sample(tiny_models.flux, 64) == first
    c = load_sd_components(str(tiny_models.flux))
    # attention counted: QK^T and AV over image and text tokens in every block, forward and the backward's two (on CPU
    # SDPA's flash kernel is an op the counter skips: the count was 61 MFLOP, below attention's own 214)
    config, tokens = c.denoiser.config, (64 // 8 // 2) ** 2 + FAMILIES["flux"].max_sequence_length
    width, blocks = config.num_attention_heads * config.attention_head_dim, config.num_layers + config.num_single_layers
    assert first >= 3 * 2 * (2 * tokens**2 * width) * blocks
    config = c.denoiser.config
    text = Conditioning(torch.randn(1, 8, config.joint_attention_dim), torch.randn(1, config.pooled_projection_dim))
    out = FAMILIES["flux"].predict(c.denoiser, torch.randn(1, 16, 8, 8), torch.full((1,), 500.0), text, guidance=3.5)
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()
