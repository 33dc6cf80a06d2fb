import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import LAUNCHERS, FakeHub, launch, launch_command, pause_at_step, run_script, train_in


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
    # the interval is Student's over the same held-out samples before and after (paired): around the paired mean
    paired = [b - a for a, b in zip(report["rows"][1]["sample_losses"]["cat"], report["rows"][2]["sample_losses"]["cat"])]
    assert len(paired) >= 2 and abs(sum(paired) / len(paired) - report["forgetting"]["cat"]) < 1e-9
    # clustered by photo: the validation split has one photo of cat here (3 sketches), so no interval can be had
    # (as independent items it gave one that reached no other photo)
    assert report["forgetting_ci95"]["cat"] == [None, None]
    table = (out / "sequential_report.md").read_text()
    assert "| 2: apple |" in table and "| base |" in table

    # Resumable at stage: finished stages are skipped, an unfinished one is trained again.
    mtime = (stages[0] / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    (stages[1] / "stage_metrics.json").unlink()
    proc = run_script("train/dreambooth_sequential.py", *args)
    assert "stage 1 (cat) already finished" in proc.stderr
    assert (stages[0] / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime
    assert (stages[1] / "stage_metrics.json").is_file()
    # a rerun with another rate took the finished stages and their report as its own (exit 0)
    at = args.index("--learning_rate")
    proc = run_script("train/dreambooth_sequential.py", *args[:at], "--learning_rate", "1e-2", *args[at + 2:], check=False)
    assert proc.returncode == 2 and "holds the stages of another run (learning_rate: 0.001 there, 0.01 now)" in proc.stderr
    # more stages follow ("commas or spaces"), and the folder's record says so: a rerun of fewer or other stages, or
    # with the forgetting's held-out samples or the global batch changed, is refused (they were taken before)
    at = args.index("--stages")
    more = [*args[:at], "--stages", "cat, apple, airplane", *args[at + 2:]]
    proc = run_script("train/dreambooth_sequential.py", *more)
    assert "stage 2 (apple) already finished" in proc.stderr and (out / "stage-03-airplane" / "model_index.json").is_file()
    extended = json.loads((out / "sequential_report.json").read_text())
    assert extended["stages"] == ["cat", "apple", "airplane"]
    # the base row measures the added category too (it showed "—"), and keeps what it had
    assert set(extended["rows"][0]["loss"]) == {"cat", "apple", "airplane"}
    assert extended["rows"][0]["sample_losses"]["cat"] == report["rows"][0]["sample_losses"]["cat"]
    for flags, said in ((["--stages", "cat,apple"], "stages: cat,apple,airplane there, cat,apple now"),
                        (["--num_heldout_samples", "2"], "num_heldout_samples: 4 there, 2 now"),
                        (["--train_batch_size", "2"], "global batch: 1 there, 2 now")):
        proc = run_script("train/dreambooth_sequential.py", *more, *flags, check=False)
        assert proc.returncode == 2 and said in proc.stderr.strip().splitlines()[-1], proc.stderr[-1500:]
    # a category the shards lack: one line before anything is written
    proc = run_script("train/dreambooth_sequential.py", *args[:at], "--stages", "cat,unicorn", *args[at + 2:],
                      "--output_dir", tmp_path / "typo", check=False)
    assert proc.returncode == 2 and "unknown category 'unicorn'" in proc.stderr and not (tmp_path / "typo").exists()


def test_each_stage_starts_from_the_last_one_s_folder_with_its_category_s_class_images(tmp_path):
    """Stage options: from stage 2 on, a full fine-tune loads the previous stage's folder, saved without the base's
    --variant or --revision (stage 2 stopped: 'no file named model.fp16.safetensors'); a class prompt naming
    {category} gets each stage's category and a class folder of its own (one unformatted set served every stage),
    drawn by the base model."""
    from sketch2real.cli import parse_options
    from sketch2real.training.sequential import SequentialOptions, stage_options

    opts = parse_options(SequentialOptions, [
        "--pretrained_model_name_or_path", "base", "--variant", "fp16", "--revision", "main", "--shard_dir", "s",
        "--output_dir", str(tmp_path), "--stages", "cat,apple", "--instance_prompt", "a {category} in the style of sks",
        "--with_prior_preservation", "--class_prompt", "a sketch of a {category}", "--class_data_dir", "classes"])
    first, second = stage_options(opts, 0, "cat", "base"), stage_options(opts, 1, "apple", str(tmp_path / "stage-01-cat"))
    assert (first.pretrained_model_name_or_path, first.variant, first.revision) == ("base", "fp16", "main")
    assert (second.pretrained_model_name_or_path, second.variant, second.revision) == (str(tmp_path / "stage-01-cat"), None, None)
    assert (first.class_prompt, second.class_prompt) == ("a sketch of a cat", "a sketch of a apple")
    # class images are drawn by the model a stage starts from, each folder by one model (it records it: a shared
    # folder of the base's images was refused at stage 2): a full fine-tune's later stages get folders of their own
    assert (first.class_data_dir, second.class_data_dir) == ("classes/cat", "classes/stage-02-apple")
    from sketch2real.training.dreambooth import class_image_settings

    assert class_image_settings(second)["model"] == str(tmp_path / "stage-01-cat")
    # a literal brace stays one for the stage's DreamBooth, which fills its prompts again (a KeyError at its validation)
    from sketch2real.training.prompts import fill_category

    braces = stage_options(dataclasses.replace(opts, instance_prompt="a {category} of {{sks}}",
                                               validation_prompt=["{{sks}}: a car_(sedan)'s {category}"]), 1, "car_(sedan)", "m")
    assert [fill_category(p, "car_(sedan)") for p in (braces.instance_prompt, *braces.validation_prompt)] == [
        "a car (sedan) of {sks}", "{sks}: a car_(sedan)'s car (sedan)"]
    shared = dataclasses.replace(opts, class_prompt="a sketch")
    assert [stage_options(shared, i, c, "base").class_data_dir for i, c in enumerate(["cat", "apple"])] == [
        "classes", "classes/stage-02-apple"]
    lora = dataclasses.replace(shared, lora_rank=4)  # LoRA stages draw from the base: one folder serves them all
    assert [stage_options(lora, i, c, "prev").class_data_dir for i, c in enumerate(["cat", "apple"])] == ["classes"] * 2
    # a tracker run per stage, named as wandb takes it: `dreambooth_sequential/cat` was refused by wandb after the
    # models loaded, and --tracker_project_name put every stage in one run at the same steps
    assert [first.tracker_project_name, second.tracker_project_name] == [
        "dreambooth_sequential-stage-01-cat", "dreambooth_sequential-stage-02-apple"]
    named = dataclasses.replace(opts, tracker_project_name="myexp")
    assert stage_options(named, 1, "apple", "prev").tracker_project_name == "myexp-stage-02-apple"
    # --max_train_steps, which --steps_per_stage replaces, was ignored silently: refused
    from sketch2real.cli import UserError

    with pytest.raises(UserError, match="--max_train_steps is not used here"):
        parse_options(SequentialOptions, ["--pretrained_model_name_or_path", "base", "--shard_dir", "s", "--output_dir",
                                          str(tmp_path), "--stages", "cat", "--max_train_steps", "3"]).check()


def test_sequential_needs_stages(tiny_models, shard_dir, tmp_path):
    proc = run_script("train/dreambooth_sequential.py", "--pretrained_model_name_or_path", tiny_models.sd,
                      "--shard_dir", shard_dir, "--output_dir", tmp_path, check=False)
    assert proc.returncode == 2 and "--stages needs at least one category" in proc.stderr


def test_sequential_lora_continues_the_same_adapters_stage_after_stage(tiny_models, shard_dir, tmp_path):
    """With --lora_rank each stage trains the previous stage's adapters on the base model: stage 2's LoRA is bit for bit
    what train/dreambooth.py gives from stage 1's folder (--initial_lora, at the alpha saved in it, 16, without
    --lora_alpha), and not what a fresh start gives; a LoRA of another rank or alpha is refused in one line. With
    --push_to_hub the run is one commit at the end, not one per stage."""
    import torch

    from .helpers import weights

    out = tmp_path / "seq"
    common = ["--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir, "--resolution", "64",
              "--learning_rate", "1e-2", "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none",
              "--num_heldout_samples", "2", "--lora_rank", "4"]
    hub = FakeHub(tmp_path / "hub")
    try:
        run_script("train/dreambooth_sequential.py", *common, "--output_dir", out, "--stages", "cat,apple",
                   "--steps_per_stage", "3", "--instance_prompt", "a {category} in the style of sks", "--lora_alpha", "16",
                   "--push_to_hub", "--hub_model_id", "lab/forgetting", env=hub.env())
    finally:
        hub.close()
    # --push_to_hub: one commit of the run (stages and report) at the end, the stages' latent caches left out
    assert hub.commits == [{"repo": "lab/forgetting", "message": "End of training: 2 stages"}]
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    pushed = {p.relative_to(hub.root / "lab/forgetting").as_posix(): p.read_bytes()
              for p in (hub.root / "lab/forgetting").rglob("*") if p.is_file()}
    assert any("/latent_cache/" in name for name in local)
    assert pushed == {k: v for k, v in local.items() if "/latent_cache/" not in k} and "sequential_report.md" in pushed
    card = pushed["README.md"].decode()  # what the hub shows of the run: the stages and the forgetting table
    assert card.startswith("---\n") and "`stage-02-apple/`" in card and pushed["sequential_report.md"].decode() in card
    # each stage's card loads it from the run's repository (its lines named the local folder it trained in)
    use = pushed["stage-02-apple/README.md"].decode().split("## Use", 1)[1]
    assert ("pipe.load_lora_weights('lab/forgetting', subfolder='stage-02-apple', "
            "weight_name='pytorch_lora_weights.safetensors')") in use and str(out) not in use
    assert "hf download lab/forgetting --include 'stage-02-apple/*' --local-dir forgetting" in use
    code = use.split("```python\n", 1)[1].split("\n```", 1)[0]
    names: dict = {}
    exec(code.replace("'lab/forgetting'", repr(str(hub.root / "lab/forgetting"))), names)  # noqa: S102 (the repository at hand)
    assert names["pipe"].get_active_adapters() and names["image"].size[0] > 0
    stages = [out / "stage-01-cat", out / "stage-02-apple"]
    assert all((s / "pytorch_lora_weights.safetensors").is_file() for s in stages)
    config = json.loads((stages[1] / "run_config.json").read_text())
    assert config["initial_lora"] == str(stages[0]) and config["pretrained_model_name_or_path"] == str(tiny_models.sd)
    report = json.loads((out / "sequential_report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["base", "1: cat", "2: apple"] and set(report["forgetting"]) == {"cat"}

    alone = ["--instance_category", "apple", "--instance_prompt", "a apple in the style of sks", "--max_train_steps", "3"]
    run_script("train/dreambooth.py", *common, *alone, "--output_dir", tmp_path / "continued", "--initial_lora", stages[0])
    run_script("train/dreambooth.py", *common, *alone, "--output_dir", tmp_path / "fresh")
    sequential, continued, fresh = (weights(p) for p in (stages[1], tmp_path / "continued", tmp_path / "fresh"))
    assert sequential.keys() == continued.keys() and all(torch.equal(sequential[k], continued[k]) for k in sequential)
    assert any(not torch.equal(sequential[k], fresh[k]) for k in sequential)

    proc = run_script("train/dreambooth.py", *common[:-1], "8", *alone, "--output_dir", tmp_path / "rank8",
                      "--initial_lora", stages[0], check=False)
    assert proc.returncode == 2 and "does not fit" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    proc = run_script("train/dreambooth.py", *common, *alone, "--output_dir", tmp_path / "alpha8", "--lora_alpha", "8",
                      "--initial_lora", stages[0], check=False)
    assert proc.returncode == 2 and "trained with alpha 16, not --lora_alpha 8" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("launcher, family, lora", [(launcher, "sd", False) for launcher in LAUNCHERS]
                         + [("ddp", "sdxl", False), ("1", "sd3", False), ("zero2", "flux2-klein", True)])
def test_bf16_matrix_and_resume_at_a_stage(launcher, family, lora, tiny_models, shard_dir, tmp_path):
    """The process group lives for the whole script: stage 2 runs with 2 processes (it died there before); SDXL and
    SD3 too, and LoRA stages (FLUX.2 [klein] under ZeRO-2) whose adapters load in the plain pipeline."""
    import diffusers

    from sketch2real.family import FAMILIES

    out = tmp_path / "seq"
    model, pipeline = getattr(tiny_models, family.replace("-", "_")), getattr(diffusers, FAMILIES[family].pipeline)
    args = ["--pretrained_model_name_or_path", model, "--shard_dir", shard_dir, "--stages", "cat,apple",
            "--steps_per_stage", "2", "--resolution", "64", "--learning_rate", "1e-3", "--checkpointing_steps", "1",
            "--validation_steps", "2", "--num_validation_images", "1", "--validation_inference_steps", "2",
            "--report_to", "none", "--instance_prompt", "a {category} in the style of sks", "--num_heldout_samples", "2",
            "--train_batch_size", "2" if launcher == "1" else "1", *(["--lora_rank", "4"] if lora else [])]
    train_in(launcher, "train/dreambooth_sequential.py", *args, out=out, run_dir="stage-02-apple")
    report = json.loads((out / "sequential_report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["base", "1: cat", "2: apple"]
    assert all(v == v for r in report["rows"] for v in r["loss"].values())  # finite held-out losses
    for stage in ("stage-01-cat", "stage-02-apple"):
        if lora:
            pipeline.from_pretrained(model).load_lora_weights(out / stage)
        else:
            pipeline.from_pretrained(out / stage)
        assert (out / stage / "validation" / "step-000002.png").is_file()
    # a finished stage's checkpoints are removed (its model is saved; a rerun skips it)
    assert not list(out.glob("stage-*/checkpoint-*")) and (out / "stage-02-apple" / "stage_metrics.json").is_file()
    if launcher == "ddp" and family == "sd":  # stopped in stage 3 on 2 processes: a rerun skips 1-2, resumes 3
        more = [*args, "--stages", "cat,apple,airplane", "--output_dir", out, "--mixed_precision", "bf16"]
        argv, env = launch_command("train/dreambooth_sequential.py", *more)
        marker = tmp_path / "paused"
        proc = subprocess.Popen([sys.executable, *argv], env=pause_at_step(env, 1, marker, "stage-03-airplane"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ranks = [Path(f"{marker}.rank{r}") for r in (0, 1)]
        while not all(f.is_file() and f.read_text() for f in ranks) and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        for rank in ranks:  # as Slurm signals every task
            os.kill(int(rank.read_text()), signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=600)
        stage = out / "stage-03-airplane"
        assert (out / "PREEMPTED").is_file() and sorted(p.name for p in stage.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"], stderr[-3000:]
        proc = launch("train/dreambooth_sequential.py", *more)
        assert "stage 2 (apple) already finished" in proc.stderr and "resumed from" in proc.stderr
        assert (stage / "stage_metrics.json").is_file() and not (out / "PREEMPTED").exists()
        assert not list(stage.glob("checkpoint-*"))


def test_the_table_prints_a_loss_read_back_as_null():
    """A NaN held-out loss is null in a stage's JSON (strict JSON); a rerun reads it back and printed a traceback."""
    from sketch2real.training.sequential import format_table

    table = format_table({"categories": ["cat", "dog"], "rows": [{"name": "1: cat", "loss": {"cat": None, "dog": 0.25}}]})
    assert "| 1: cat | — | 0.2500 |" in table


@pytest.mark.parametrize("stages, prompt, message", [
    ("cat,apple", "a cat in the style of sks", "put {category} in --instance_prompt"),
    ("cat,apple,cat", "a {category} in the style of sks", "cat is given twice"),
])
def test_stages_that_would_train_or_measure_the_same_thing_twice_are_refused(stages, prompt, message, tmp_path):
    """Stages of several categories with a prompt without {category} trained every stage on the first one's prompt; a
    category given twice had its forgetting measured against its own later stage: both refused in one line."""
    from sketch2real.cli import UserError, parse_options
    from sketch2real.training.sequential import SequentialOptions

    def check(*args: str) -> None:
        parse_options(SequentialOptions, ["--pretrained_model_name_or_path", "base", "--shard_dir", "s", "--output_dir",
                                          str(tmp_path), *args]).check()

    with pytest.raises(UserError, match=message.replace("{", r"\{").replace("}", r"\}")):
        check("--stages", stages, "--instance_prompt", prompt)
    check("--stages", "cat", "--instance_prompt", "a cat in the style of sks")  # one stage: no {category} needed


@pytest.mark.parametrize("flags, message", [
    (["--max_train_steps", "400"], "--max_train_steps is not used here"),  # at DreamBooth's default too (accepted before)
    (["--instance_category", "dog"], "--instance_category is not used here"),
    (["--resume_from_checkpoint", "out/checkpoint-2"], "give --resume_from_checkpoint latest"),
    (["--num_heldout_samples", "0"], "forgetting is measured on that many held-out samples"),  # 16 were, silently
    (["--lora_rank", "2", "--lora_type", "lokr"], "cannot continue the previous stage's LoKr")])  # stage 2's traceback
def test_dreambooth_flags_each_stage_sets_itself_are_refused_when_given(flags, message, tmp_path):
    """DreamBooth's options that each stage sets itself were replaced without a word when given (a --max_train_steps
    at DreamBooth's default value was taken, --instance_category and a checkpoint path ignored): one line each."""
    from sketch2real.cli import UserError, parse_options
    from sketch2real.training.sequential import SequentialOptions

    args = ["--pretrained_model_name_or_path", "base", "--shard_dir", "s", "--output_dir", str(tmp_path), "--stages",
            "cat,apple", "--instance_prompt", "a {category} in the style of sks"]
    with pytest.raises(UserError, match=re.escape(message)):
        parse_options(SequentialOptions, [*args, *flags]).check()
    parse_options(SequentialOptions, [*args, "--resume_from_checkpoint", "latest"]).check()


def test_a_first_run_stopped_before_any_stage_leaves_no_base_row_to_a_rerun(tiny_models, shard_dir, tmp_path):
    """A first run that measured the base and then stopped (an error, a crash before stage 1's first checkpoint) left
    base_metrics.json; a rerun with other options (it may: no stage to continue) took that base row as its own."""
    out = tmp_path / "seq"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"stages": ["cat"], "pretrained_model_name_or_path": "another"}))
    stale = {"name": "base", "loss": {"cat": 123.0}, "loss_ci95": {"cat": [1.0, 2.0]}, "sample_losses": {"cat": [123.0] * 2}}
    (out / "base_metrics.json").write_text(json.dumps(stale))
    run_script("train/dreambooth_sequential.py", "--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir",
               shard_dir, "--output_dir", out, "--stages", "cat", "--steps_per_stage", "1", "--resolution", "64",
               "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none", "--num_heldout_samples", "2",
               "--instance_prompt", "a {category} in the style of sks")
    base = json.loads((out / "sequential_report.json").read_text())["rows"][0]
    assert base["name"] == "base" and base["loss"]["cat"] != 123.0 and len(base["sample_losses"]["cat"]) == 2


def test_each_category_s_held_out_images_are_encoded_once_for_every_stage_that_measures_them(tiny_models, shard_dir):
    """After stage k the k categories so far are measured: their held-out images were read and VAE-encoded again at
    every stage (k² encodes over a run). Once each now, with the losses a fresh encode gives."""
    from types import SimpleNamespace
    from unittest import mock

    import torch

    from sketch2real.cli import parse_options
    from sketch2real.models import load_sd_components
    from sketch2real.training.data import load_shard_images
    from sketch2real.training.diffusion import DenoisingObjective
    from sketch2real.training.sequential import SequentialOptions, _heldout_losses
    from sketch2real.training.validation import heldout_denoising_losses, heldout_latents

    c = load_sd_components(str(tiny_models.sd))
    objective = DenoisingObjective(c.noise_scheduler)
    task = SimpleNamespace(c=c, objective=SimpleNamespace(unweighted=lambda: objective),
                           predictor=lambda model: lambda noisy, timesteps, prompts: noisy * 0.5)
    opts = parse_options(SequentialOptions, ["--pretrained_model_name_or_path", str(tiny_models.sd), "--shard_dir",
                                             str(shard_dir), "--output_dir", "unused", "--stages", "cat,apple",
                                             "--resolution", "32", "--num_heldout_samples", "4"])
    cache: dict = {}
    with mock.patch.object(c.vae, "encode", wraps=c.vae.encode) as encode:
        first = _heldout_losses(task, torch.nn.Linear(1, 1), opts, ["cat"], cache)
        encoded_once = encode.call_count
        second = _heldout_losses(task, torch.nn.Linear(1, 1), opts, ["cat", "apple"], cache)
    assert encoded_once > 0 and encode.call_count == 2 * encoded_once  # apple's, not cat's again
    assert second["cat"] == first["cat"]
    images, _ = load_shard_images(str(shard_dir), opts.validation_split, "apple", opts.instance_image_type, 32, 4,
                                  opts.seed)
    fresh = heldout_denoising_losses(task.predictor(None), objective, heldout_latents(c.vae, images, opts.seed),
                                     [""] * len(images), opts.seed)
    assert second["apple"] == fresh.tolist()


def test_a_rerun_that_pushes_says_which_finished_stages_cards_load_their_local_folder(tiny_models, shard_dir, tmp_path):
    """The README's way on clusters without network: train without --push_to_hub, push later. A stage finished by the
    earlier run keeps its card (its lines load the local folder it trained in); the pushing run says so, by name."""
    out = tmp_path / "seq"
    common = ["--pretrained_model_name_or_path", tiny_models.sd, "--shard_dir", shard_dir, "--resolution", "64",
              "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none", "--num_heldout_samples",
              "2", "--lora_rank", "4", "--output_dir", out, "--stages", "cat", "--steps_per_stage", "2",
              "--instance_prompt", "a {category} in the style of sks"]
    run_script("train/dreambooth_sequential.py", *common)
    hub = FakeHub(tmp_path / "hub")
    try:
        proc = run_script("train/dreambooth_sequential.py", *common, "--push_to_hub", "--hub_model_id", "lab/forgetting",
                          env=hub.env())
    finally:
        hub.close()
    assert hub.commits == [{"repo": "lab/forgetting", "message": "End of training: 1 stages"}]
    assert "the cards of stage-01-cat (finished by a run without --push_to_hub) load their stage from its local" in proc.stderr
