"""Every command block of README.md is run by a test as written, or says here why not yet: a new block without an
entry fails, an entry naming a test that does not exist fails, and an entry whose block left the README fails."""

from __future__ import annotations

import ast
import json
import os
import shlex
from types import SimpleNamespace

import torch

from .helpers import REPO, fresh_clone, readme_block, readme_blocks, readme_cpu_env, run_readme_command, weights

# A block's first line -> the tests that run it ("file.py::test"), or the reason it is not run on CI yet.
RUN_BY = {
    "make demo": ["not run by the suite: make test is .ci/run itself; make demo takes ~10 min on 2 cores the first time "
                  "(9.3 min from a fresh clone, run by hand; its table is in the README), ~3.5 min with the tiny base cached"],
    "pip install torch torchvision --index-url": ["not run: needs PyTorch's CUDA index (no network on CI); the "
                                                  "requirements line is make setup's, which .ci/run runs"],
    "SKETCHY=/data/sketchy bash slurm/pipeline.sh": [
        "test_two_nodes.py::test_the_readme_pipeline_as_written_ends_in_its_reports",
        "test_two_nodes.py::test_the_pipeline_on_two_nodes_ends_with_the_metrics_of_one_node"],
    "export SBATCH_GPUS_PER_NODE=0": ["test_readme.py::test_the_cpu_form_is_what_the_slurm_tests_run_with"],
    "accelerate launch --config_file accelerate_configs/multi_gpu.yaml": [
        "test_readme.py::test_the_readme_accelerate_block_runs_in_its_cpu_form_two_bf16_processes_with_8bit_adamw"],
    "nice -n 10 python bench/full_scale.py": ["not run: a 17-minute benchmark (its figures are the README's table)"],
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


def test_the_cpu_form_is_what_the_slurm_tests_run_with():
    """The README's "Without GPUs" variables are exactly what the tests' Slurm runs set (beyond the models)."""
    words = shlex.split(readme_block("export SBATCH_GPUS_PER_NODE=0").replace("\\\n", " "))
    assert words[0] == "export"
    documented = dict(word.split("=", 1) for word in words[1:])
    env = readme_cpu_env(SimpleNamespace(sd="tiny-sd", llava="tiny-llava", torch_home="torch_home"))
    assert {k: env[k] for k in documented} == documented
    added = {k for k in env if env[k] != os.environ.get(k)} - set(documented)
    assert added <= {"MODEL", "CAPTION_MODEL", "TORCH_HOME", "HF_HUB_OFFLINE"}, added


def test_the_readme_accelerate_block_runs_in_its_cpu_form_two_bf16_processes_with_8bit_adamw(tiny_models, shard_dir,
                                                                                            tmp_path):
    """README: the `accelerate launch` block from a fresh clone, in the CPU form the README gives (`--num_processes 2`,
    no other variable), on the tiny model and shards at 64 px for 2 steps: its GPU config runs two gloo processes,
    in bf16, with 8-bit AdamW, and saves a pipeline plain diffusers loads."""
    from diffusers import StableDiffusionPipeline

    repo = fresh_clone(tmp_path / "clone")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    run_readme_command(readme_block("accelerate launch --config_file accelerate_configs/multi_gpu.yaml").strip(), repo, env,
                       **{"multi_gpu.yaml": "multi_gpu.yaml --num_processes 2", "data/shards": str(shard_dir),
                          "stable-diffusion-v1-5/stable-diffusion-v1-5": str(tiny_models.sd),
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
