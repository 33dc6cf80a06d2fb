"""slurm/*.sh against a real one-node Slurm on localhost (started here; .ci/run installs slurm-wlm and munge): the
README's flow-family block and the study's reproduction as written, its SDXL block in its CPU form. The README's
pipeline, the data prep job and preemption run on the two-node cluster (tests/test_two_nodes.py), on one node and on two."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .helpers import (
    REPO,
    TINY_PIPELINE_CONFIGS,
    forked_python,
    fresh_clone,
    readme_block,
    readme_cpu_env,
    readme_pipeline_env,
    run_readme_command,
    wait_for_jobs,
    write_configs,
)

pytestmark = pytest.mark.skipif(shutil.which("slurmctld") is None or os.geteuid() != 0,
                                reason="needs root and Debian's slurmctld/slurmd/munge (make slurm-deps)")


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (make slurm-deps)")
    scripts = sorted(str(p) for p in (REPO / "slurm").glob("*.sh")) + [str(REPO / "scripts/demo.sh")]
    proc = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("slurm")
    already = subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    if not already:
        subprocess.run(["bash", str(REPO / "slurm/local_cluster.sh"), "start", str(scratch)], check=True, timeout=60)
    yield scratch
    if not already:
        subprocess.run(["bash", str(REPO / "slurm/local_cluster.sh"), "stop", str(scratch)], timeout=30)


def test_the_readme_flow_family_block_as_written_trains_a_rank_16_lora_of_each_family(slurm, tiny_models, shard_dir,
                                                                                      tmp_path):
    """README: the SD3.5 / FLUX.1 / FLUX.2 [klein] block as written, from a fresh clone, in the CPU form: the hub ids
    are the one substitution (by the tiny models of those families), STEPS (a documented variable) short. Each job
    trains its family at 512 px into its own folder, and saves a rank-16 LoRA its pipeline class loads."""
    from safetensors import safe_open

    repo = fresh_clone(tmp_path / "clone")
    env = readme_cpu_env(tiny_models, SHARDS=str(shard_dir), STEPS="2", GPUS_PER_NODE="1")  # one process a job
    models = {"stabilityai/stable-diffusion-3.5-medium": tiny_models.sd3, "black-forest-labs/FLUX.1-dev": tiny_models.flux,
              "black-forest-labs/FLUX.2-klein-base-4B": tiny_models.flux2_klein}
    with forked_python(env, repo) as env:
        submitted = run_readme_command(readme_block("MODEL=stabilityai/stable-diffusion-3.5-medium").strip(), repo, env,
                                       **{hub_id: str(path) for hub_id, path in models.items()})
        jobs = [word for line in submitted.splitlines() for word in line.split() if word.isdigit()]
        assert len(jobs) == 3, submitted
        wait_for_jobs(jobs, env, repo / "logs")
    for output, model in zip(("sd35_cat", "flux_cat", "klein_cat"), models.values()):
        run = repo / "runs" / output
        config = json.loads((run / "run_config.json").read_text())
        assert (config["pretrained_model_name_or_path"], config["resolution"], config["lora_rank"]) == (str(model), 512, 16)
        assert config["instance_category"] == "cat" and config["max_train_steps"] == 2
        with safe_open(run / "pytorch_lora_weights.safetensors", "pt") as f:
            ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_A" in k}
        assert ranks == {16}, (output, ranks)
    assert json.loads((repo / "runs/sd35_cat/run_config.json").read_text())["weighting_scheme"] == "logit_normal"


def test_the_readme_sdxl_block_in_its_cpu_form_trains_each_method_and_generates_after_the_lora(slurm, tiny_models,
                                                                                              shard_dir, tmp_path):
    """README: the SDXL block from a fresh clone, in the CPU form the README gives for it: the hub ids by the tiny
    SDXL and its VAE, 64 px for 1024 (a tiny SDXL job at 1024 px takes ~90 s on 2 cores), STEPS short. The LoRA, the
    full UNet under DeepSpeed ZeRO-2 (its line as written: no variable turns DeepSpeed off), TI in both encoders,
    ControlNet, and the generation that waits for the LoRA job."""
    from diffusers import ControlNetModel, StableDiffusionXLPipeline
    from safetensors import safe_open

    repo = fresh_clone(tmp_path / "clone")
    env = readme_cpu_env(tiny_models, SHARDS=str(shard_dir), STEPS="2", GPUS_PER_NODE="1")  # one process a job
    vae = tiny_models.sdxl / "vae"
    with forked_python(env, repo) as env:
        submitted = run_readme_command(readme_block("XL=stabilityai/stable-diffusion-xl-base-1.0").strip(), repo, env,
                                       **{"stabilityai/stable-diffusion-xl-base-1.0": str(tiny_models.sdxl),
                                          "madebyollin/sdxl-vae-fp16-fix": str(vae), "--resolution 1024": "--resolution 64"})
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
        assert len(jobs) == 5 and all(j in jobs for j in submitted.split() if j.isdigit()), (jobs, submitted)
        wait_for_jobs(jobs, env, repo / "logs")
    runs = repo / "runs"
    lora = json.loads((runs / "xl_lora_cat" / "run_config.json").read_text())
    assert (lora["lora_rank"], lora["resolution"], lora["pretrained_vae_model_name_or_path"]) == (16, 64, str(vae))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
    pipe.load_lora_weights(runs / "xl_lora_cat")  # plain diffusers loads it
    full = json.loads((runs / "xl_cat" / "metrics.json").read_text())
    assert full["distributed_type"] == "DEEPSPEED" and full["steps"] == 2
    assert json.loads((runs / "xl_cat" / "run_config.json").read_text())["gradient_checkpointing"]
    StableDiffusionXLPipeline.from_pretrained(runs / "xl_cat")
    with safe_open(runs / "xl_ti" / "learned_embeds.safetensors", "pt") as f:
        assert set(f.keys()) == {"clip_l", "clip_g"}
    ControlNetModel.from_pretrained(runs / "xl_controlnet")
    generated = [json.loads(line) for line in (runs / "gen_xl_lora" / "index.jsonl").read_text().splitlines()]
    assert generated and all(r["prompt"].endswith(" in the style of sks") for r in generated)


STUDY_ROWS = {"llava-4", "llava-5", "llava-8", "dreambooth-sks-cat", "dreambooth-cat-style-sks", "dreambooth-sequential",
              "textual-inversion-cat", "textual-inversion-all"}


@pytest.fixture(scope="module")
def study_shards(sketchy_root, tmp_path_factory) -> Path:
    """Shards of the study's categories only (cat, and apple and airplane for its sequence): 17 test sketches where
    the five categories have 27, and every row's images and Inception features scale with them."""
    from sketch2real.shards import write_shards
    from sketch2real.sketchy import SketchyRelease
    from sketch2real.splits import build_splits, write_splits

    root = tmp_path_factory.mktemp("study")
    write_splits(build_splits(SketchyRelease(sketchy_root), seed=0, categories=["cat", "apple", "airplane"]), root / "splits")
    write_shards(root / "splits", sketchy_root, root / "shards", max_samples=16, progress=False)
    return root / "shards"


def test_the_readme_study_reproduction_as_written_scores_every_row(slurm, tiny_models, study_shards, tmp_path):
    """README: `bash slurm/reproduce_study.sh --partition gpu` after data prep (SHARDS: the shards), from a fresh clone:
    every row of the study's table scored against the test sketches at 2048 dims, each row as the study made it."""
    shard_dir = study_shards
    repo = fresh_clone(tmp_path / "clone")
    env = readme_pipeline_env(tiny_models, tmp_path / "configs", SHARDS=str(shard_dir), CATEGORIES="apple,airplane",
                              GPUS_PER_NODE="1", STUDY_SAMPLES="6")  # one process a job: 16 jobs of start-up on 2 cores
    every_sample = {k: v for k, v in TINY_PIPELINE_CONFIGS["generate"].items() if k != "max_per_category"}
    write_configs(tmp_path / "configs", {"generate": every_sample})  # each row: an image per test sample, as the study
    with forked_python(env, repo) as env:
        submitted = run_readme_command(readme_block("bash slurm/reproduce_study.sh").strip(), repo, env)
        jobs = [word for line in submitted.splitlines() for word in line.split() if word.isdigit()]
        assert len(jobs) == 16, submitted
        wait_for_jobs(jobs, env, repo / "logs")
        # Then the full protocol, as written: every metric of two rows over the whole test split (DINOV2_MODEL and
        # CLIP_MODEL unset: the default extractors' hub ids, the tiny ones in the hub cache)
        submitted = run_readme_command(readme_block("GENERATED='llava-4=runs/study/gen_llava-4").strip(), repo, env)
        wait_for_jobs([w for w in submitted.split() if w.isdigit()], env, repo / "logs")
    study = repo / "runs" / "study"
    scores = json.loads((study / "fid" / "metrics.json").read_text())
    assert set(scores["sets"]) == STUDY_ROWS and scores["dims"] == 2048 and scores["reference"]["name"] == "test sketches"
    assert all(row["fid"] > 0 and row["n_generated"] > 0 for row in scores["sets"].values())
    protocol = json.loads((study / "fid_protocol" / "metrics.json").read_text())  # STUDY_SAMPLES drawn sketches
    assert set(protocol["sets"]) == STUDY_ROWS and protocol["dims"] == 2048 and protocol["reference"]["n"] == 6
    assert all(row["n_generated"] == 6 for row in protocol["sets"].values())  # the drawn samples' images, every row
    config = {row: json.loads((study / f"dreambooth_{row}" / "run_config.json").read_text()) for row in ("sks-cat", "cat-style-sks")}
    assert config["sks-cat"]["instance_prompt"] == "a photo of a sks cat" and config["sks-cat"]["num_instance_images"] == 3
    assert config["cat-style-sks"]["instance_prompt"] == "a cat in the style of sks"
    assert json.loads((study / "textual_inversion_cat" / "run_config.json").read_text())["categories"] == ["cat"]
    prompts = {json.loads(line)["prompt"] for line in (study / "gen_dreambooth-sequential" / "index.jsonl").read_text().splitlines()}
    assert "a picture of a cat in the style of sks" in prompts
    assert sorted(p.name for p in (study / "dreambooth_sequential").glob("stage-*")) == ["stage-01-apple", "stage-02-airplane"]
    assert {json.loads(line)["prompt_id"] for line in (study / "captions" / "captions.jsonl").read_text().splitlines()} == {"4", "5", "8"}

    # the full protocol: every metric of two rows over the whole test split
    full = json.loads((study / "fid_full" / "metrics.json").read_text())
    assert set(full["sets"]) == {"llava-4", "dreambooth"} and full["reference"]["name"] == "test sketches"
    assert full["reference"]["n"] == scores["reference"]["n"] > protocol["reference"]["n"]
    metrics = ("fid", "kid", "fd_dinov2", "cmmd", "precision", "recall", "density", "coverage", "clip_score", "clip_accuracy")
    assert all(row[m] == row[m] and f"{m}_ci95" in row for row in full["sets"].values() for m in metrics), full["sets"]
