"""Every command block of README.md is run by a test as written, or says here why not yet: a new block without an
entry fails, an entry naming a test that does not exist fails, and an entry whose block left the README fails."""

from __future__ import annotations

import ast
import json
import os
import shlex

import pytest
import torch

from .helpers import (
    REPO,
    fresh_clone,
    hub_cache_of_defaults,
    readme_block,
    readme_blocks,
    readme_cpu_env,
    run_readme_command,
    weights,
)

# A block's first line -> the tests that run it ("file.py::test"), or the reason it is not run on CI yet.
RUN_BY = {
    "make demo": ["test_readme.py::test_make_demo_from_a_fresh_clone_prints_the_readme_s_table"],  # slow: --run-slow
    # (make test is .ci/run itself)
    "pip install torch torchvision --index-url": ["not run: needs PyTorch's CUDA index (no network on CI); the "
                                                  "requirements line is make setup's, which .ci/run runs"],
    "SKETCHY=/data/sketchy bash slurm/pipeline.sh": [
        "test_two_nodes.py::test_the_readme_pipeline_as_written_ends_in_its_reports",
        "test_two_nodes.py::test_the_pipeline_on_two_nodes_ends_with_the_metrics_of_one_node"],
    "export SBATCH_GPUS_PER_NODE=0": ["test_readme.py::test_the_cpu_form_is_what_the_slurm_tests_run_with"],
    "accelerate launch --config_file accelerate_configs/multi_gpu.yaml": [
        "test_readme.py::test_the_readme_accelerate_block_runs_in_its_cpu_form_two_bf16_processes_with_8bit_adamw"],
    "nice -n 10 python bench/full_scale.py": [  # slow: --run-slow
        "test_readme.py::test_the_full_scale_bench_as_written_gives_the_readme_s_rows_and_sizes"],
    "XL=stabilityai/stable-diffusion-xl-base-1.0": [
        "test_slurm.py::test_the_readme_sdxl_block_in_its_cpu_form_trains_each_method_and_generates_after_the_lora"],
    "MODEL=stabilityai/stable-diffusion-3.5-medium": [
        "test_slurm.py::test_the_readme_flow_family_block_as_written_trains_a_rank_16_lora_of_each_family"],
    "bash slurm/reproduce_study.sh": ["test_slurm.py::test_the_readme_study_reproduction_as_written_scores_every_row"],
    "GENERATED='llava-4=runs/study/gen_llava-4": [
        "test_slurm.py::test_the_readme_study_reproduction_as_written_scores_every_row"],
}


def _entry(block: str) -> str | None:
    matches = [key for key in RUN_BY if block.lstrip().startswith(key)]
    return matches[0] if len(matches) == 1 else None


def test_every_readme_block_has_a_run_or_a_reason():
    blocks = readme_blocks()
    missing = [b.splitlines()[0] for b in blocks if _entry(b) is None]
    assert not missing, f"README blocks with no entry in RUN_BY: {missing}"
    stale = set(RUN_BY) - {_entry(b) for b in blocks}
    assert not stale, f"RUN_BY entries whose block left the README: {stale}"


def test_every_named_test_exists():
    for runs in RUN_BY.values():
        for run in runs:
            if "::" not in run:
                assert run.startswith("not run"), run
                continue
            path, name = run.split("::")
            tree = ast.parse((REPO / "tests" / path).read_text())
            assert name in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, run


def test_the_cpu_form_is_what_the_slurm_tests_run_with(tiny_models):
    """The README's "Without GPUs" variables are exactly what the tests' Slurm runs set (beyond where the models are:
    the default hub ids' cache and Inception's weights, offline); the models are the defaults."""
    words = shlex.split(readme_block("export SBATCH_GPUS_PER_NODE=0").replace("\\\n", " "))
    assert words[0] == "export"
    documented = dict(word.split("=", 1) for word in words[1:])
    env = readme_cpu_env(tiny_models)
    assert {k: env[k] for k in documented} == documented
    added = {k for k in env if env[k] != os.environ.get(k)} - set(documented)
    assert added <= {"HF_HUB_CACHE", "TORCH_HOME", "HF_HUB_OFFLINE"}, added
    assert "MODEL" not in env and "CAPTION_MODEL" not in env


def test_the_readme_accelerate_block_runs_in_its_cpu_form_two_bf16_processes_with_8bit_adamw(tiny_models, shard_dir,
                                                                                            tmp_path):
    """README: the `accelerate launch` block from a fresh clone, in the CPU form the README gives (`--num_processes 2`,
    no other variable), its hub id as written (the tiny model in the hub cache), on the shards at 64 px for 2 steps:
    its GPU config runs two gloo processes, in bf16, with 8-bit AdamW, and saves a pipeline plain diffusers loads."""
    from diffusers import StableDiffusionPipeline

    repo = fresh_clone(tmp_path / "clone")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache_of_defaults(tiny_models))}
    env.pop("ACCELERATE_USE_CPU", None)
    run_readme_command(readme_block("accelerate launch --config_file accelerate_configs/multi_gpu.yaml").strip(), repo, env,
                       **{"--num_processes 8": "--num_processes 2", "data/shards": str(shard_dir),
                          "--resolution 512": "--resolution 64", "--max_train_steps 400": "--max_train_steps 2"})
    out = repo / "runs" / "dreambooth_cat"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["num_processes"], metrics["distributed_type"], metrics["mixed_precision"], metrics["steps"]) == \
        (2, "MULTI_CPU", "bf16", 2)
    assert "torch.uint8" in metrics["optimizer_dtypes"]["state"]  # 8-bit AdamW's moments
    config = json.loads((out / "run_config.json").read_text())
    assert config["gradient_checkpointing"] and config["train_batch_size"] == 2 and config["learning_rate"] == 5e-6
    StableDiffusionPipeline.from_pretrained(out)
    base, trained = weights(tiny_models.sd / "unet"), weights(out / "unet")
    assert any(not torch.equal(trained[k], base[k]) for k in base)


# The README's demo table: a row's start -> the demo report's effect row (its start; None: no KID difference) and
# its style row.
DEMO_ROWS = {"base (`a {category}`)": (None, "base"),
             "Textual Inversion": ("Textual Inversion", "textual_inversion"),
             "style LoRA, DoRA, EMA weights": ("style LoRA (DoRA, EMA", "style_lora"),
             "style LoRA, DoRA, trained weights": ("the same LoRA without its EMA", "style_lora_without_ema"),
             "base, cat only": (None, "base, cat only"),
             "DreamBooth, cat": ("DreamBooth", "dreambooth (cat)")}
# What the README's prose after the table says -> the report's effect row.
DEMO_PROSE = {r"EMA vs trained weights: KID (\S+ \[\S+, \S+\])": "the style LoRA's EMA vs its trained weights",
              r"KID (\S+ \[\S+, \S+\]) against TI's images": "the style LoRA vs Textual Inversion",
              r"DreamBooth's cat raised it over the base by (\S+ \[\S+, \S+\])": "DreamBooth 'a cat in the style of sks' vs "
                                                                               "base 'a cat': more sketch-like"}


def _estimate(text: str) -> tuple[float, float, float]:
    """`-2.2 [-5.5, +1.1]` (either minus sign) -> (value, low, high)."""
    import re

    found = re.fullmatch(r"\s*([-+]?[\d.]+) \[([-+]?[\d.]+), ([-+]?[\d.]+)\]\s*", text.replace("−", "-"))
    assert found, text
    return tuple(float(x) for x in found.groups())


def _table(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header line starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _agrees(readme: str, report: str, verdict: str | None = None) -> bool:
    """The README's figure lies in the report's 95% interval, and says "significant" exactly where the report does."""
    value, low, high = _estimate(readme)
    _, report_low, report_high = _estimate(report)
    inside = report_low <= value <= report_high
    return inside and (verdict is None or (verdict == "significant") == (low > 0 or high < 0))


@pytest.mark.slow
def test_make_demo_from_a_fresh_clone_prints_the_readme_s_table(tmp_path):
    """README: `make demo` as written, from a fresh clone (it installs what is missing: the clone's package, put back
    after), ends in demo/report.md, and every figure of the README's demo table and its prose lies in the report's 95%
    interval, with the same verdict (significant or not distinguishable)."""
    import subprocess
    import sys

    repo = fresh_clone(tmp_path / "clone")
    command = readme_block("make demo").splitlines()[0]
    assert command.startswith("make demo ")
    try:
        run_readme_command(command, repo, {**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800)
    finally:  # make setup installed the clone's package: this checkout's again
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
                       check=True, capture_output=True)
    disagree = demo_disagreements((repo / "demo" / "report.md").read_text(), (REPO / "README.md").read_text())
    assert not disagree, disagree


def demo_disagreements(report: str, readme: str) -> list[tuple]:
    """The README's demo figures (table and prose) that the demo's report.md does not back: outside its 95% interval,
    or with another verdict."""
    import re

    effects = {row[0]: (row[2], row[3]) for row in _table(report, "| effect |")}
    styles = {row[0]: row[1:] for row in _table(report, "| generated set | sketchiness")}
    rows = _table(readme, "| generated set (prompt) |")
    assert len(rows) == len(DEMO_ROWS)
    disagree = []
    for label, kid, *style in rows:
        effect, style_row = next(v for k, v in DEMO_ROWS.items() if label.startswith(k))
        if effect is not None:
            value, verdict = next(v for k, v in effects.items() if k.startswith(effect))
            disagree += [] if _agrees(kid, value, verdict) else [(label, kid, value, verdict)]
        disagree += [(label, a, b) for a, b in zip(style, styles[style_row]) if not _agrees(a, b)]
    for pattern, effect in DEMO_PROSE.items():
        value, verdict = next(v for k, v in effects.items() if k.startswith(effect))
        readme_figure = re.search(pattern, readme).group(1)
        disagree += [] if _agrees(readme_figure, value, verdict) else [(effect, readme_figure, value, verdict)]
    return disagree


def full_scale_disagreements(bench_table: str, readme: str) -> list:
    """Where the README's full-scale table is not the bench's: other rows, or other figures wherever they are sizes and
    counts of the seeded release (times and RSS vary run to run)."""
    measured = {row[0]: row[1:] for row in _table(bench_table, "| figure |")}
    written = {row[0]: row[1:] for row in _table(readme, "| figure | measured here |")}
    if list(measured) != list(written):
        return [("rows", list(measured), list(written))]
    sizes = [row for row in written if any(word in row for word in ("bytes", "on disk", "would hold", "fp32 cache"))]
    assert len(sizes) >= 10, sizes
    return [(row, measured[row], written[row]) for row in sizes if measured[row] != written[row]]


@pytest.mark.slow
def test_the_full_scale_bench_as_written_gives_the_readme_s_rows_and_sizes(tmp_path):
    """README: `bench/full_scale.py` as written (its output folder in tmp): the README's table has the bench's rows
    and, wherever they are sizes and counts, its figures."""
    command = readme_block("python bench/full_scale.py").strip()
    run_readme_command(command, REPO, {**os.environ}, timeout=3600, **{"/tmp/s2r-fs-020": str(tmp_path / "fs")})
    disagree = full_scale_disagreements((tmp_path / "fs" / "full_scale.md").read_text(), (REPO / "README.md").read_text())
    assert not disagree, disagree


def _script_default(script: str, variable: str) -> str | None:
    """`value` of the script's `${VARIABLE:-value}`, if it has one."""
    import re

    found = re.search(r"\$\{" + variable + r":-((?:\$\{\w+\}|[^}\"\s])+)\}", (REPO / script).read_text())
    return found.group(1) if found else None


def test_the_step_by_step_table_reads_only_what_an_earlier_row_writes():
    """README "Or step by step": each job writes where its "writes" cell says (OUTPUT as given, else the script's
    default), and every `runs/...` a job reads (a model, embeddings, generated sets) is an earlier job's output. The
    table once scored folders no row wrote."""
    import re

    rows = _table((REPO / "README.md").read_text(), "| job | command | writes |")
    assert len(rows) >= 8
    outputs: set[str] = set()
    for job, command, writes in rows:
        words = shlex.split(command.strip("`").split("` (")[0].strip("`"))
        env = dict(w.split("=", 1) for w in words[: words.index("sbatch")])
        script = next(w for w in words if w.startswith("slurm/"))
        output = env.get("OUTPUT") or _script_default(script, "OUTPUT")
        if output is None:  # data prep: DATA's folders
            continue
        for variable in re.findall(r"\$\{(\w+)\}", output):
            output = output.replace(f"${{{variable}}}", env.get(variable) or _script_default(script, variable))
        written = re.findall(r"runs/[\w./<>-]+", writes)
        assert written and all(w.startswith(output + "/") or w == output for w in written), (job, output, written)
        read = {"/".join(path.split("/")[:2]) for path in re.findall(r"runs/[\w./-]+", command)} - {output}
        assert read <= outputs, (job, read - outputs)
        outputs.add(output)


def test_a_plain_pip_install_holds_every_module_of_the_package(tmp_path):
    """`pip install .` (not -e) must hold every module: the demo and the benches run sketch2real.testing."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"
    shutil.copytree(REPO / "sketch2real", source / "sketch2real", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    packaged = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    modules = {path.relative_to(source).as_posix() for path in (source / "sketch2real").rglob("*.py")}
    assert modules - packaged == set()
