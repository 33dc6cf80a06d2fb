import json

import pytest

from .helpers import LAUNCHERS, launch, run_script, train_in


def test_sequential_writes_a_folder_per_stage_and_the_forgetting_table(tiny_models, shard_dir, tmp_path):
    out = tmp_path / "seq"
    args = ["--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir, "--output_dir", out,
            "--stages", "cat,apple", "--steps_per_stage", "4", "--resolution", "64", "--learning_rate", "1e-3",
            "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none",
            "--instance_prompt", "a {category} in the style of sks", "--num_heldout_samples", "4"]
    run_script("train/dreambooth_sequential.py", *args)
    stages = [out / "stage-01-cat", out / "stage-02-apple"]
    assert all((s / "model_index.json").is_file() for s in stages)
    assert json.loads((stages[0] / "run_config.json").read_text())["instance_prompt"] == "a cat in the style of sks"
    # Stage 2 starts from stage 1's weights, not from the base model.
    assert json.loads((stages[1] / "run_config.json").read_text())["pretrained_model_name_or_path"] == str(stages[0])
    report = json.loads((out / "sequential_report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["base", "1: cat", "2: apple"]
    assert set(report["rows"][2]["loss"]) == {"cat", "apple"} and set(report["rows"][1]["loss"]) == {"cat"}
    assert report["rows"][1]["loss"]["cat"] < report["rows"][0]["loss"]["cat"]  # stage 1 learned its category
    assert abs(report["forgetting"]["cat"] - (report["rows"][2]["loss"]["cat"] - report["rows"][1]["loss"]["cat"])) < 1e-9
    assert set(report["forgetting"]) == {"cat"}  # the last stage cannot have forgotten anything yet
    # the interval is a bootstrap over the same held-out samples before and after: it holds the paired mean
    paired = [b - a for a, b in zip(report["rows"][1]["sample_losses"]["cat"], report["rows"][2]["sample_losses"]["cat"])]
    assert len(paired) >= 2 and abs(sum(paired) / len(paired) - report["forgetting"]["cat"]) < 1e-9
    low, high = report["forgetting_ci95"]["cat"]
    assert min(paired) <= low < report["forgetting"]["cat"] < high <= max(paired)  # a real interval around the mean
    table = (out / "sequential_report.md").read_text()
    assert "| 2: apple |" in table and "| base |" in table

    # Resumable at stage: finished stages are skipped, an unfinished one is trained again.
    mtime = (stages[0] / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    (stages[1] / "stage_metrics.json").unlink()
    proc = run_script("train/dreambooth_sequential.py", *args)
    assert "stage 1 (cat) already finished" in proc.stderr
    assert (stages[0] / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime
    assert (stages[1] / "stage_metrics.json").is_file()


def test_sequential_needs_stages(tiny_models, shard_dir, tmp_path):
    proc = run_script("train/dreambooth_sequential.py", "--pretrained_model_name_or_path", tiny_models.sd,
                      "--shard_dir", shard_dir, "--output_dir", tmp_path, check=False)
    assert proc.returncode == 2 and "--stages needs at least one category" in proc.stderr


def test_sequential_lora_is_refused_before_training(tiny_models, shard_dir, tmp_path):
    """(It trained stage 1 and then failed reading the LoRA folder as stage 2's base model.)"""
    proc = run_script("train/dreambooth_sequential.py", "--pretrained_model_name_or_path", tiny_models.sd,
                      "--shard_dir", shard_dir, "--output_dir", tmp_path, "--stages", "cat,apple", "--lora_rank", "4",
                      check=False)
    assert proc.returncode == 2 and "--lora_rank is not supported yet" in proc.stderr
    assert not (tmp_path / "stage-01-cat").exists()


@pytest.mark.parametrize("launcher, family", [(launcher, "sd") for launcher in LAUNCHERS] + [("ddp", "sdxl"), ("1", "sd3")])
def test_bf16_matrix_and_resume_at_a_stage(launcher, family, tiny_models, shard_dir, tmp_path):
    """The process group lives for the whole script: stage 2 runs with 2 processes (it died there before); SDXL and
    SD3 too."""
    import diffusers

    from sketch2real.family import FAMILIES

    out = tmp_path / "seq"
    model, pipeline = getattr(tiny_models, family), getattr(diffusers, FAMILIES[family].pipeline)
    args = ["--pretrained_model_name_or_path", model, "--shard_dir", shard_dir, "--stages", "cat,apple",
            "--steps_per_stage", "2", "--resolution", "64", "--learning_rate", "1e-3", "--checkpointing_steps", "1",
            "--validation_steps", "2", "--num_validation_images", "1", "--validation_inference_steps", "2",
            "--report_to", "none", "--instance_prompt", "a {category} in the style of sks", "--num_heldout_samples", "2",
            "--train_batch_size", "2" if launcher == "1" else "1"]
    train_in(launcher, "train/dreambooth_sequential.py", *args, out=out, run_dir="stage-02-apple")
    report = json.loads((out / "sequential_report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["base", "1: cat", "2: apple"]
    assert all(v == v for r in report["rows"] for v in r["loss"].values())  # finite held-out losses
    for stage in ("stage-01-cat", "stage-02-apple"):
        pipeline.from_pretrained(out / stage)
        assert (out / stage / "validation" / "step-000002.png").is_file()
    if launcher == "ddp":  # resume at a stage with 2 processes: stage 1 skipped, stage 2 resumed from its checkpoint
        (out / "stage-02-apple" / "stage_metrics.json").unlink()
        proc = launch("train/dreambooth_sequential.py", *args, "--output_dir", out, "--mixed_precision", "bf16")
        assert "stage 1 (cat) already finished" in proc.stderr and "resumed from" in proc.stderr
        assert (out / "stage-02-apple" / "stage_metrics.json").is_file()
