"""The training step on one GPU, ours against diffusers' example script in the same run: ms/step, images/s, share of
the chip (FLOPs counted by torch, not assumed), peak GiB; full-size architectures with random weights built on the
spot (nothing is downloaded).

    bash bench/gpu_speed.sh --diffusers_dir PATH [--size sd15] [--deadline 480] [--only KEY ...] [--rounds N]
                            [--results FILE]

PATH holds diffusers' `examples/dreambooth/train_dreambooth.py` (a huggingface/diffusers checkout, or a folder with
that file; nothing of it is copied here). Ours: the per-step time after the first read of the loss (warm-up and
compilation left out; `steady_steps_per_second` of metrics.json). Theirs, which reports no such figure: the wall-time
difference of a short and a long run over the step difference (start-up, loading and saving cancel). Rows run in
order of value (or of the `--only` keys given) and each is skipped, said so, when it would end past `--deadline`
seconds from the start; a row still running at the deadline is stopped and says so (the table is printed whatever
happens). Validation is off in our runs, as in the reference's.
`--size tiny` runs every row on the tiny test model at 64 px on CPU in a minute (tests/test_bench.py), so the
script cannot rot; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import peak_bf16, training_flops_per_sample

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a sks sketch of a cat"


@dataclass(frozen=True)
class Size:
    model: str  # SD_SIZES name
    resolution: int
    steps: int  # of our runs (the first `logging` are warm-up)
    logging: int
    reference_steps: tuple[int, int]  # diffusers' short and long runs
    seconds: dict[str, float] = field(default_factory=dict)  # a row's expected wall time (deadline planning)
    # building a model ("sd", "sdxl", "flux") with random weights, added to the first row that uses it
    build_seconds: dict[str, float] = field(default_factory=dict)


SIZES = {
    # the reference's difference spans 100 steps: ~25 s at 250 ms/step, against the two runs' 30-40 s of start-up
    "sd15": Size("sd15", 512, 60, 10, (10, 110), {"plain": 40, "compile": 150, "reference": 110, "sdxl": 240, "flux": 150},
                 {"sd": 30, "sdxl": 45, "flux": 100}),
    "tiny": Size("tiny", 64, 6, 2, (2, 4), {"plain": 15, "compile": 60, "reference": 30, "sdxl": 30, "flux": 20},
                 {"sd": 5, "sdxl": 5, "flux": 5}),
}


@dataclass(frozen=True)
class Row:
    key: str  # what --only names
    name: str
    script: str  # ours: train/...; "reference": diffusers' script
    batch: int
    args: tuple = ()
    trains: str = "unet"  # what the FLOPs count (bench.common.training_flops_per_sample)
    kind: str = "plain"  # plain, compile, reference, sdxl, flux: the expected-time class
    model: str = "sd"  # sd, sdxl or flux
    recipe_gib: float | None = None  # the README's memory recipe for it (bench/memory_recipes.py), beside the peak
    versus_reference: bool = False  # the reference trains the same (DreamBooth, full UNet): its ratio is shown


def rows(size: str) -> list[Row]:
    """The rows, most valuable first."""
    db, ti = "train/dreambooth.py", "train/textual_inversion.py"
    lora = ("--lora_rank", "8")
    return [
        Row("defaults", "DreamBooth full UNet, bf16, batch 4 (defaults: latents cached)", db, 4, versus_reference=True),
        Row("diffusers", "diffusers train_dreambooth.py, bf16, batch 4", "reference", 4, kind="reference"),
        Row("compile", "DreamBooth full UNet, bf16, batch 4, --torch_compile", db, 4, ("--torch_compile",),
            kind="compile", versus_reference=True),
        Row("compile-cudagraphs", "DreamBooth full UNet, bf16, batch 4, --torch_compile --torch_compile_mode "
            "reduce-overhead", db, 4, ("--torch_compile", "--torch_compile_mode", "reduce-overhead"), kind="compile",
            versus_reference=True),
        Row("uncached", "DreamBooth full UNet, bf16, batch 4, --cache_latents false", db, 4, ("--cache_latents", "false"),
            versus_reference=True),
        Row("batch32", "DreamBooth full UNet, bf16, batch 32", db, 32),
        Row("ti-bf16", "Textual Inversion, bf16, batch 4", ti, 4, trains="embeddings"),
        Row("ti-fp16", "Textual Inversion, fp16, batch 4", ti, 4, ("--mixed_precision", "fp16"), trains="embeddings"),
        Row("lora-bf16", "DreamBooth LoRA r=8, bf16, batch 4", db, 4, lora, trains="lora"),
        Row("lora-fp16", "DreamBooth LoRA r=8, fp16, batch 4", db, 4, (*lora, "--mixed_precision", "fp16"), trains="lora"),
        Row("batch32-compile", "DreamBooth full UNet, bf16, batch 32, --torch_compile", db, 32, ("--torch_compile",),
            kind="compile"),
        Row("sdxl-lora", "SDXL DreamBooth LoRA r=8, bf16, batch 4, 1024 px", db, 4, (*lora, "--gradient_checkpointing"),
            trains="lora", kind="sdxl", model="sdxl"),
        # the README's recipe row "LoRA r=16, 1 GPU, AdamW", 512 px, T5 released (its prompts encoded once)
        Row("flux-lora", "FLUX.1 [dev] DreamBooth LoRA r=16, bf16, batch 1, 512 px (T5 of 2 blocks: released once its "
            "prompt is encoded)", db, 1, ("--lora_rank", "16", "--gradient_checkpointing"), trains="lora", kind="flux",
            model="flux", recipe_gib=23.6),
    ]


def selected_rows(size: str, only: list[str]) -> list[Row]:
    """The rows `--only` names by key, in its order (all rows, in order of value, without it); an unknown key: exit."""
    keys = {row.key: row for row in rows(size)}
    unknown = [key for key in only if key not in keys]
    if unknown:
        sys.exit(f"gpu_speed: no row {', '.join(unknown)} (rows: {', '.join(keys)})")
    return [keys[key] for key in dict.fromkeys(only)] if only else list(keys.values())


def model_name(size: Size, model: str) -> str:
    """The SD_SIZES name of a row's model ("sd", "sdxl" or "flux") at this size."""
    full = size.model == "sd15"
    return {"sd": size.model, "sdxl": "sdxl" if full else "tiny_sdxl", "flux": "flux_dev" if full else "tiny_flux"}[model]


def prepare(work: Path, size: Size, model: str) -> tuple[Path, Path]:
    """(the model with random weights, a folder of training images at the resolution), built once in `work`."""
    from sketch2real.synthetic import make_synthetic_sketchy
    from sketch2real.testing.tiny import build_flow_matching, build_sd

    name = model_name(size, model)
    resolution = size.resolution * (2 if model == "sdxl" and size.model == "sd15" else 1)
    path = work / f"{name}-random"
    if not (path / "model_index.json").is_file() and model == "flux":
        import torch

        full = name == "flux_dev"  # 12B: made on the GPU in bf16 (seconds); T5 cut to 2 blocks, as it is released
        build_flow_matching(path, name, device="cuda" if full else None, dtype=torch.bfloat16 if full else None,
                            t5_layers=2 if full else None)
    elif not (path / "model_index.json").is_file():
        build_sd(path, name)
    images = work / f"sketchy-{resolution}"
    if not images.is_dir():
        make_synthetic_sketchy(images, categories=["cat"], photos_per_category=8, sketches_per_photo=2,
                               test_photos_per_category=0, size=resolution)
    return path, next(images.glob("256x256/sketch/*/cat"))


def ours(row: Row, model: Path, images: Path, resolution: int, size: Size, out: Path, env: dict, timeout: float) -> dict:
    """Run one of our trainers; its metrics.json."""
    data = (["--instance_data_dir", images, "--instance_prompt", PROMPT] if "dreambooth" in row.script else
            ["--train_data_dir", images, "--placeholder_token", "<sketch>", "--initializer_token", "sketch"])
    precision = [] if "--mixed_precision" in row.args else ["--mixed_precision", "bf16"]
    cmd = [sys.executable, REPO / row.script, "--pretrained_model_name_or_path", model, *data, "--resolution", resolution,
           "--train_batch_size", row.batch, "--max_train_steps", size.steps, "--logging_steps", size.logging,
           "--output_dir", out, "--validation_steps", 0, *precision, *row.args]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads((out / "metrics.json").read_text())


def reference(script: Path, model: Path, images: Path, resolution: int, batch: int, steps: int, out: Path,
              env: dict, timeout: float) -> float:
    """Wall seconds of diffusers' DreamBooth script for `steps` steps with the same model, images, batch, bf16."""
    cmd = [sys.executable, script, "--pretrained_model_name_or_path", model, "--instance_data_dir", images,
           "--instance_prompt", PROMPT, "--resolution", resolution, "--train_batch_size", batch, "--max_train_steps",
           steps, "--output_dir", out, "--seed", "0", "--mixed_precision", "bf16"]
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1])
    return time.perf_counter() - start


def run_row(row: Row, round_: int, size: Size, work: Path, script: Path | None, env: dict, cuda: bool,
            started: float, deadline: float, flops_of, peak: float | None) -> dict:
    """One row's run: its figures, or the note saying why it did not run or failed."""
    elapsed = time.perf_counter() - started
    result = {"row": row.name, "round": round_, "batch": row.batch, "started_s": round(elapsed, 1)}
    if row.recipe_gib is not None:
        result["recipe_gib"] = row.recipe_gib
    unbuilt = not (work / f"{model_name(size, row.model)}-random" / "model_index.json").is_file()
    if elapsed + size.seconds[row.kind] + size.build_seconds[row.model] * unbuilt > deadline:
        return {**result, "note": f"skipped: past the deadline ({elapsed:.0f} s gone)"}
    if row.script == "reference" and script is None:
        return {**result, "note": "skipped: no --diffusers_dir"}
    if "fp16" in row.args and not cuda:
        return {**result, "note": "skipped: fp16 needs CUDA"}
    model, images = prepare(work, size, row.model)
    resolution = size.resolution * (2 if row.model == "sdxl" and size.model == "sd15" else 1)
    out = work / "runs" / f"{round_}-{abs(hash(row.name)) % 10**8}"
    def timeout() -> float:  # what is left before the deadline: a row stopped there still leaves the table
        return max(1.0, deadline - (time.perf_counter() - started))

    try:
        if row.script == "reference":
            short, long = (reference(script, model, images, resolution, row.batch, n, out / str(n), env, timeout())
                           for n in size.reference_steps)
            ms = 1000 * (long - short) / (size.reference_steps[1] - size.reference_steps[0])
            result.update(ms_per_step=ms, method=f"wall({size.reference_steps[1]}) - wall({size.reference_steps[0]})")
        else:
            m = ours(row, model, images, resolution, size, out, env, timeout())
            result.update(ms_per_step=1000 / m["steady_steps_per_second"], peak_gib=m["peak_memory_mb"] / 1024,
                          cache_peak_gib=m["cache_peak_memory_mb"] / 1024,  # before training: fp16's fp32 VAE
                          final_loss=m["final_loss"], host_reads=m["host_reads"],
                          method=f"steady after step {m['steady_from_step']}")
            if "--torch_compile" in row.args:  # a recompile in the timed steps, or CUDA graphs inductor skipped
                result.update(recompiles=m["graphs_compiled_after_first_read"], cudagraph_skips=m["cudagraph_skips"])
                result["method"] += f"; {m['graphs_compiled_after_first_read']} recompiles after it"
                if "reduce-overhead" in row.args:
                    result["method"] += f", {m['cudagraph_skips']} CUDA-graph skips"
        images_per_second = 1000 * row.batch / result["ms_per_step"]
        flops = flops_of(model, resolution, row.trains)
        result.update(images_per_second=images_per_second, tflop_per_image=flops / 1e12,
                      chip_share=images_per_second * flops / peak if peak else None)
    except subprocess.TimeoutExpired:
        result["note"] = f"FAILED: stopped at the deadline ({deadline:.0f} s)"
    except Exception as err:  # a row's failure is reported in its row; the others still run
        result["note"] = f"FAILED: {str(err)[:160]}"
    result["wall_s"] = round(time.perf_counter() - started - elapsed, 1)
    return result


def fill_reference_ratios(results: list[dict], selected: list[Row]) -> None:
    """`vs_diffusers` of each comparable row against the reference run of its round and batch, wherever in the round
    that ran (the first row, the defaults, runs before it: its ratio was never computed)."""
    compared = {row.name for row in selected if row.versus_reference}
    references = {row.name for row in selected if row.script == "reference"}
    ms = {(r["round"], r["batch"]): r["ms_per_step"] for r in results if r["row"] in references and "ms_per_step" in r}
    for r in results:
        if r["row"] in compared and "ms_per_step" in r and (r["round"], r["batch"]) in ms:
            r["vs_diffusers"] = ms[r["round"], r["batch"]] / r["ms_per_step"]


def table_line(name: str, runs: list[dict]) -> str:
    """A row of the table: the median round's figures (and the range when there were several), or the first note."""
    done = sorted((r for r in runs if "ms_per_step" in r), key=lambda r: r["ms_per_step"])
    if not done:
        return f"| {name} |  |  |  |  |  | {runs[0].get('note', '')} |"
    r = done[(len(done) - 1) // 2]
    ratios = sorted(x["vs_diffusers"] for x in done if "vs_diffusers" in x)
    note = r["method"] + (f"; median of {len(done)} rounds, {done[0]['ms_per_step']:.1f}-{done[-1]['ms_per_step']:.1f} "
                          "ms" if len(done) > 1 else "") + (f"; the README's recipe: {r['recipe_gib']} GiB" if
                                                          "recipe_gib" in r else "")
    cells = [f"{r['ms_per_step']:.1f}", f"{r['images_per_second']:.1f}",
             f"{r['chip_share']:.1%}" if r.get("chip_share") is not None else "",
             f"{max(x['peak_gib'] for x in done):.1f}" if "peak_gib" in r else "",
             f"{ratios[(len(ratios) - 1) // 2]:.2f}x" if ratios else "", note]
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers_dir", default="", help="folder with examples/dreambooth/train_dreambooth.py")
    parser.add_argument("--size", default="sd15", choices=tuple(SIZES))
    parser.add_argument("--work_dir", default="/tmp/s2r-gpu-speed")
    parser.add_argument("--deadline", type=float, default=480, help="seconds: rows that would end later are skipped")
    parser.add_argument("--only", action="append", default=[], help="run only this row, by key (repeatable: in the "
                        "order given): " + ", ".join(row.key for row in rows("tiny")))
    parser.add_argument("--rounds", type=int, default=1, help="run the rows this many times, alternating (the table "
                        "shows each row's median round and the range)")
    parser.add_argument("--results", default="", help="also append each row as a JSON line to this file")
    args = parser.parse_args()
    started = time.perf_counter()
    import torch

    cuda = torch.cuda.is_available()
    if args.size != "tiny" and not cuda:
        print("gpu_speed: no CUDA device (--size tiny runs the rows on CPU)", file=sys.stderr)
        return 2
    size = SIZES[args.size]
    script = Path(args.diffusers_dir) / "examples/dreambooth/train_dreambooth.py" if args.diffusers_dir else None
    if script is not None and not script.is_file():
        script = Path(args.diffusers_dir) / "train_dreambooth.py"
    if script is not None and not script.is_file():  # before any row spends GPU time (it failed at the reference row)
        print(f"gpu_speed: --diffusers_dir {args.diffusers_dir} holds neither examples/dreambooth/train_dreambooth.py "
              "nor train_dreambooth.py", file=sys.stderr)
        return 2
    work = Path(args.work_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    device = torch.cuda.get_device_name() if cuda else "CPU"
    peak = peak_bf16(device)
    print(f"{device} | torch {torch.__version__} | {size.model} architecture, random weights | {size.resolution} px | "
          f"ours: {size.steps} steps, timed after step {size.logging}", flush=True)
    results = []  # one per row and round
    selected = selected_rows(args.size, args.only)
    flops_of = functools.cache(training_flops_per_sample)
    for round_ in range(args.rounds):  # rows alternate: a drift of the machine meets every row alike
        for row in selected:
            result = run_row(row, round_, size, work, script, env, cuda, started, args.deadline, flops_of, peak)
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(result) + "\n")
    fill_reference_ratios(results, selected)
    print("\n| run | ms/step | img/s | share of the chip | peak GiB | vs diffusers | note |\n|---|---:|---:|---:|---:|---:|---|")
    for row in selected:
        print(table_line(row.name, [r for r in results if r["row"] == row.name]))
    if peak:
        print(f"share of the chip: counted FLOPs per image of what trains (the UNet, LoRA or embeddings' backward "
              f"included; not the VAE encode of uncached rows and the reference) x img/s / {peak / 1e12:.0f} TFLOP/s "
              f"(dense bf16, {device})")
    return 1 if any(r.get("note", "").startswith("FAILED") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
