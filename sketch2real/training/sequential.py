"""Sequential-class DreamBooth: one category after another, each stage from the previous stage's
weights (full weights, or the same LoRA adapters continued), with forgetting measured as a stage x category table
of held-out denoising losses."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from sketch2real.cli import UserError, option
from sketch2real.io import write_json
from sketch2real.metrics import mean_ci95, verdict
from sketch2real.shards import sample_refs
from sketch2real.sketchy import category_words
from sketch2real.training.accelerator import eager_mode, main_process_view
from sketch2real.training.callbacks import Callback, ModelCard, default_callbacks
from sketch2real.training.checkpoints import check_resume, list_checkpoints, options_fingerprint
from sketch2real.training.data import load_shard_images
from sketch2real.training.dreambooth import DreamBoothOptions, DreamBoothTask
from sketch2real.training.hub import hub_repo_id, push_output
from sketch2real.training.loop import train
from sketch2real.training.model_card import CARD, front_matter
from sketch2real.training.preemption import PREEMPTED_EXIT_CODE, clear_preempted, mark_preempted
from sketch2real.training.prompts import with_category
from sketch2real.training.validation import heldout_denoising_losses, heldout_latents

logger = logging.getLogger("sketch2real")


@dataclass(kw_only=True, frozen=True)
class SequentialOptions(DreamBoothOptions):
    """DreamBooth on several categories in turn; --instance_prompt may use {category}."""

    FLAGS_NOT_TAKEN: ClassVar[dict[str, str]] = {
        **DreamBoothOptions.FLAGS_NOT_TAKEN,
        **dict.fromkeys(("num_train_epochs", "repeats"), "give --steps_per_stage (optimizer steps of each stage)")}

    # DreamBooth's options that each stage sets itself: given, they are refused (not silently replaced)
    max_train_steps: int | None = option(None, help="not used: each stage trains --steps_per_stage steps", min=1,
                                         affects="runtime")
    stages: list[str] = option([], help="categories in training order, e.g. cat,dog,helicopter,hamburger (commas or spaces)")
    steps_per_stage: int = option(400, help="optimizer steps of each stage", min=1)

    def stage_list(self) -> list[str]:
        return split_stages(self.stages)

    def check(self) -> None:
        stages = self.stage_list()
        if not stages:
            raise UserError("--stages needs at least one category")
        twice = next((c for i, c in enumerate(stages) if c in stages[:i]), None)
        if twice:  # its forgetting would be measured against its own later stage
            raise UserError(f"--stages {','.join(stages)}: {twice} is given twice; give each category once")
        if len(stages) > 1 and "{category}" not in self.instance_prompt:  # every stage would learn the same prompt
            raise UserError(f"--instance_prompt {self.instance_prompt!r} is the same for every stage: put {{category}} "
                            "in --instance_prompt (e.g. 'a {category} in the style of sks')")
        if self.max_train_steps is not None:  # given: --steps_per_stage replaces it
            raise UserError("--max_train_steps is not used here: each stage trains --steps_per_stage steps")
        if self.instance_category:
            raise UserError("--instance_category is not used here: each stage's category is the next of --stages")
        if self.resume_from_checkpoint not in (None, "latest"):
            raise UserError(f"--resume_from_checkpoint {self.resume_from_checkpoint}: sequential DreamBooth resumes "
                            "its stages where they stopped: give --resume_from_checkpoint latest")
        if not self.shard_dir:
            raise UserError("--shard_dir is required: each stage's instance images and held-out images come from it")
        if self.lora_type == "lokr" and len(stages) > 1:  # stage 2 stopped with a traceback (no LoRA file to load)
            raise UserError("--lora_type lokr: a stage cannot continue the previous stage's LoKr (--initial_lora takes "
                            "LoRA adapters): use --lora_type lora, or full fine-tuning")
        if self.num_heldout_samples < 2:  # 0 turned nothing off here: 16 were measured, silently
            raise UserError(f"--num_heldout_samples {self.num_heldout_samples}: forgetting is measured on that many "
                            "held-out samples per category; give at least 2 (for its interval)")
        super().check()


def split_stages(items: list[str]) -> list[str]:
    """--stages as categories: items of commas or spaces (`cat,dog`, `cat, dog`, `cat dog`)."""
    return [s.strip() for item in items for s in item.split(",") if s.strip()]


def check_same_run(opts: SequentialOptions, out: Path, global_batch_size: int) -> bool:
    """A rerun into a folder of stages, finished or checkpointed, takes them as its own only under the options that
    made them (more stages may follow); with others (another prompt, rate, model, global batch, held-out samples: the
    forgetting's...) or fewer stages it stops in one line naming what differs. A folder where no stage got that far
    (a first run stopped by an error) takes any. Returns whether the folder holds stages to continue."""
    saved_file = out / "run_config.json"
    if not saved_file.is_file() or not any(out.glob("stage-*/stage_metrics.json")) and not any(out.glob("stage-*/checkpoint-*")):
        return False
    saved = json.loads(saved_file.read_text())
    now = options_fingerprint(opts, frozenset({"stages"}))
    now["num_heldout_samples"] = opts.num_heldout_samples  # how it ran, but the samples every forgetting compares
    left_out = set(now.defaults) - set(now)  # how it ran, and the stages
    theirs = {k: v for k, v in saved.items() if k not in left_out}
    stages = split_stages(saved.get("stages", []))
    differences = [] if now.matches(theirs) else [now.differences(theirs)]
    for summary in sorted(out.glob("stage-*/metrics.json"))[:1]:  # a finished stage's: its processes x batch per process
        stage = json.loads((summary.parent / "run_config.json").read_text())
        theirs_batch = stage.get("train_batch_size", 0) * json.loads(summary.read_text()).get("num_processes", 0)
        if theirs_batch != global_batch_size:
            differences.append(f"global batch: {theirs_batch} there, {global_batch_size} now")
    if opts.stage_list()[: len(stages)] != stages:
        differences.append(f"stages: {','.join(stages)} there, {','.join(opts.stage_list())} now")
    if not differences:
        return True
    raise UserError(f"{out} holds the stages of another run ({'; '.join(differences)}): give another --output_dir "
                    "(or the same options: more stages may follow)")


def stage_options(opts: SequentialOptions, index: int, category: str, previous: str) -> SequentialOptions:
    """Stage `index`'s options: its category's prompts, class images and steps; full weights start from the previous
    stage's pipeline (a local folder saved without a variant or revision), LoRA from the base with the previous
    stage's adapters. Class images are the model's the stage starts from (DreamBooth's prior): the base's in
    `--class_data_dir` (`/<category>` with a {category} prompt), a full fine-tune's later stages' in
    `--class_data_dir/stage-NN-<category>` (a folder records its model: another's images are refused)."""
    words = category_words(category)
    start = {"initial_lora": opts.initial_lora if index == 0 else previous} if opts.lora_rank else {
        "pretrained_model_name_or_path": previous, **({"variant": None, "revision": None} if index else {})}
    class_data_dir = opts.class_data_dir
    if class_data_dir and index and not opts.lora_rank:  # drawn by the model the stage starts from: its own folder
        class_data_dir = str(Path(opts.class_data_dir) / stage_dir("", index, category).name)
    elif class_data_dir and "{category}" in opts.class_prompt:  # the base's, each category its own
        class_data_dir = str(Path(opts.class_data_dir) / category)
    return dataclasses.replace(
        opts, **start, output_dir=str(stage_dir(opts.output_dir, index, category)), instance_category=category,
        max_train_steps=opts.steps_per_stage, resume_from_checkpoint="latest",
        push_to_hub=False,  # the run pushes its folder, stages and report, once at the end
        instance_prompt=with_category(opts.instance_prompt, category),
        validation_prompt=[with_category(p, category) for p in opts.validation_prompt],
        class_prompt=opts.class_prompt.format(category=words),
        class_data_dir=class_data_dir,
        # a tracker run per stage (one project name held every stage at the same steps), a name wandb takes (no "/")
        tracker_project_name=f"{opts.tracker_project_name or 'dreambooth_sequential'}-{stage_dir('', index, category).name}",
    )


def stage_callbacks(opts: SequentialOptions, folder: Path) -> list[Callback]:
    """A stage's callbacks: the trainer's, its card loading from the run's hub repository where the run pushes (the
    stage itself pushes nothing: its card's lines read its local folder otherwise)."""
    callbacks = default_callbacks()
    if opts.push_to_hub:
        callbacks = [ModelCard(pushed_as=(hub_repo_id(opts), folder.name)) if isinstance(c, ModelCard) else c
                     for c in callbacks]
    return callbacks


def _warn_of_local_stage_cards(opts: SequentialOptions, folders: list[Path]) -> None:
    """Stages an earlier run without --push_to_hub finished wrote cards whose lines load their local folder (a card
    is written by the run that trains its stage): said before they are pushed, not rewritten."""
    repo_id = hub_repo_id(opts)
    local = [f.name for f in folders if (f / CARD).is_file() and repo_id not in (f / CARD).read_text()]
    if local:
        logger.warning("the cards of %s (finished by a run without --push_to_hub) load their stage from its local "
                       "folder, not from %s: their Use lines need the repository's folder instead", ", ".join(local),
                       repo_id)


def reset_accelerator(accelerator) -> None:
    """Forget the previous stage's prepared objects so that the next stage prepares and checkpoints only its own."""
    accelerator.free_memory()
    accelerator._custom_objects.clear()


def stage_dir(output_dir: str, index: int, category: str) -> Path:
    return Path(output_dir) / f"stage-{index + 1:02d}-{category}"


def _drop_checkpoints(folder: Path) -> None:
    """Remove a finished stage's checkpoints: its model is saved beside them and a rerun skips the stage, so they only
    took room (a full fine-tune's is weights and optimizer state, ~10 GB for SD 1.5, for each of up to 125 stages)."""
    for _, checkpoint in list_checkpoints(folder):
        shutil.rmtree(checkpoint, ignore_errors=True)
        logger.info("removed %s (its stage is finished)", checkpoint)


def _heldout_losses(task: DreamBoothTask, model, opts: SequentialOptions, categories: list[str],
                    latents: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Each category's per-sample held-out losses (the same samples, noise and timesteps for every model). `latents`:
    each category's held-out latents (on the CPU), read and encoded once for every stage that measures it (the VAE
    is frozen: after stage k, k categories; decoded and encoded again each time, the measuring grew with k²)."""
    losses = {}
    model.eval()
    with eager_mode():
        for category in categories:
            if category not in latents:
                images, _ = load_shard_images(opts.shard_dir, opts.validation_split, category, opts.instance_image_type,
                                              opts.resolution, opts.num_heldout_samples, opts.seed)
                latents[category] = heldout_latents(task.c.vae, images, opts.seed).cpu()
            prompt = opts.instance_prompt.format(category=category_words(category))
            losses[category] = heldout_denoising_losses(task.predictor(model), task.objective.unweighted(),
                                                        latents[category], [prompt] * len(latents[category]),
                                                        opts.seed, device=task.c.vae.device).tolist()
    model.train()
    return losses


def _heldout_photos(opts: SequentialOptions, category: str) -> list[str]:
    """The photo of each of `_heldout_losses`' samples of `category`, in its order (nothing decoded)."""
    from sketch2real.sketchy import photo_key

    _, metas = load_shard_images(opts.shard_dir, opts.validation_split, category, opts.instance_image_type,
                                 opts.resolution, opts.num_heldout_samples, opts.seed, in_memory=False)
    return [photo_key(m["key"]) for m in metas]


def _unmeasured_by_base(out: Path, stages: list[str]) -> list[str]:
    """The categories of `stages` the folder's base row has no held-out losses of (all, without a base row)."""
    file = out / "base_metrics.json"
    measured = json.loads(file.read_text())["sample_losses"] if file.is_file() else {}
    return [category for category in stages if category not in measured]


def _measure_base(task: DreamBoothTask, accelerator, opts: SequentialOptions, out: Path, categories: list[str],
                  latents: dict[str, torch.Tensor]) -> None:
    """The base model's held-out losses of `categories` (`task`: the first stage's, before it trains) into the base
    row, beside those it has."""
    task.model.to(accelerator.device)  # `prepare` has not placed it yet (VAE latents are on the device)
    measured = _heldout_losses(task, task.model, opts, categories, latents)
    if accelerator.is_main_process:
        file = out / "base_metrics.json"
        earlier = json.loads(file.read_text())["sample_losses"] if file.is_file() else {}
        write_json(file, _row("base", {**earlier, **measured}))


def _row(name: str, sample_losses: dict[str, list[float]]) -> dict:
    return {"name": name, "loss": {c: float(np.mean(v)) for c, v in sample_losses.items()}, "sample_losses": sample_losses}


def sequential_card(opts: SequentialOptions, report: dict) -> str:
    """The run folder's card (`README.md`, what the hub shows of a pushed run): the stages, where each one's model
    is, and the forgetting table."""
    stages = report["stages"]
    last = stage_dir("", len(stages) - 1, stages[-1]).name
    return "\n".join([
        f"---\n{front_matter(opts.pretrained_model_name_or_path, 'dreambooth_sequential', ['lora'] if opts.lora_rank else [])}\n---",
        "", f"# Sequential DreamBooth of {opts.pretrained_model_name_or_path} on Sketchy", "",
        f"Trained with sketch2real's `train/dreambooth_sequential.py`: {len(stages)} stages ({', '.join(stages)}), "
        f"{opts.steps_per_stage} steps each, each stage from the one before. Each stage's model is in its folder "
        f"(`stage-NN-<category>/`, with its own card); the last one, `{last}/`, has learned them all in turn.", "",
        "## Held-out denoising loss of each category after each stage", "", format_table(report), ""])


def format_table(report: dict) -> str:
    """Markdown: one row per stage (and the base model), one column per category; '—' where not yet trained."""
    categories = report["categories"]
    lines = ["| after stage | " + " | ".join(categories) + " |", "|---|" + "---:|" * len(categories)]
    for row in report["rows"]:
        # None: a NaN loss read back from a stage's JSON (strict JSON has no NaN)
        cells = [f"{row['loss'][c]:.4f}" if row["loss"].get(c) is not None else "—" for c in categories]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    if report.get("forgetting"):
        lines += ["", "Forgetting: final loss − loss right after the category's own stage (> 0: forgotten), with a 95%",
                  "interval: Student's t over the held-out samples (paired: same samples, noise and timesteps).", "",
                  "| category | forgetting [95% CI] | |", "|---|---:|---|"]
        for c, v in report["forgetting"].items():
            low, high = report["forgetting_ci95"][c]
            lines.append(f"| {c} | {v:+.4f} [{low:+.4f}, {high:+.4f}] | {verdict([low, high])} |")
    return "\n".join(lines) + "\n"


def run_sequential(opts: SequentialOptions, accelerator) -> int:
    """Train every stage not yet finished; write sequential_report.{json,md}. Returns an exit status."""
    stages = opts.stage_list()
    out = Path(opts.output_dir)
    for split in (opts.split, opts.validation_split):  # a category not there: one line before anything is written
        sample_refs(opts.shard_dir, split, stages)
    global_batch_size = opts.train_batch_size * accelerator.num_processes
    continues = check_same_run(opts, out, global_batch_size)
    if accelerator.is_main_process:  # an earlier stop's (each stage clears its own): this run is under way
        clear_preempted(out)
        if not continues:  # an earlier start's base row, perhaps of another model, prompt or samples: measured anew
            (out / "base_metrics.json").unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)  # the run's stages as they are now: a later rerun continues these
        write_json(out / "run_config.json", dataclasses.asdict(opts))
    rows = []
    heldout_latents_of: dict[str, torch.Tensor] = {}  # category -> its held-out latents, for every stage's measuring
    previous = opts.pretrained_model_name_or_path
    for index, category in enumerate(stages):
        folder = stage_dir(opts.output_dir, index, category)
        metrics_file = folder / "stage_metrics.json"
        saved = folder / ("pytorch_lora_weights.safetensors" if opts.lora_rank else "model_index.json")
        files = (metrics_file, saved)
        if main_process_view(accelerator, lambda files=files: all(f.is_file() for f in files)):  # all take one path
            logger.info("stage %d (%s) already finished: %s", index + 1, category, folder)
            if accelerator.is_main_process:  # a stop between its metrics and the removal left them
                _drop_checkpoints(folder)
            rows.append(json.loads(metrics_file.read_text()))
            previous = str(folder)
            continue
        stage_opts = stage_options(opts, index, category, previous)
        check_resume(accelerator, stage_opts)  # its checkpoints of another launch: now, not after the model loads
        missing = main_process_view(accelerator, lambda: _unmeasured_by_base(out, stages))
        if missing and index:  # stages added since the base row was measured: the base model, once more
            _measure_base(DreamBoothTask(stage_options(opts, 0, stages[0], opts.pretrained_model_name_or_path),
                                         accelerator), accelerator, opts, out, missing, heldout_latents_of)
            reset_accelerator(accelerator)
        task = DreamBoothTask(stage_opts, accelerator)
        if missing and not index:
            _measure_base(task, accelerator, opts, out, missing, heldout_latents_of)
        status = train(task, task.opts, accelerator, f"dreambooth_sequential/{category}", stage_callbacks(opts, folder))
        if status == PREEMPTED_EXIT_CODE:  # slurm/common.sh looks for PREEMPTED in the job's --output_dir
            mark_preempted(accelerator, out, f"stage {index + 1} ({category}) checkpointed")
        if status != 0:
            return status
        row = {**_row(f"{index + 1}: {category}", _heldout_losses(task, task.model, opts, stages[: index + 1],
                                                                   heldout_latents_of)),
               "stage": index + 1, "category": category}
        if accelerator.is_main_process:
            write_json(metrics_file, row)
            _drop_checkpoints(folder)
        rows.append(row)
        previous = str(folder)
        reset_accelerator(accelerator)
        del task
    base_file = out / "base_metrics.json"
    base_row = [json.loads(base_file.read_text())] if base_file.is_file() else []
    forgetting, forgetting_ci95 = {}, {}
    for index, category in enumerate(stages[:-1]):  # the last stage's forgetting is 0 by definition
        after_own = rows[index]["sample_losses"].get(category)
        final = rows[-1]["sample_losses"].get(category)
        if after_own is not None and final is not None:
            paired = np.asarray(final, dtype=float) - np.asarray(after_own, dtype=float)  # null (a NaN loss) -> nan
            photos = _heldout_photos(opts, category)  # a photo's sketches are not independent samples: by photo
            forgetting[category] = float(paired.mean())
            forgetting_ci95[category] = mean_ci95(paired, photos if len(photos) == len(paired) else None)
    report = {"stages": stages, "categories": list(dict.fromkeys(stages)), "rows": base_row + rows, "forgetting": forgetting,
              "forgetting_ci95": forgetting_ci95}
    if accelerator.is_main_process:
        write_json(out / "sequential_report.json", report)
        (out / "sequential_report.md").write_text(format_table(report))
        (out / CARD).write_text(sequential_card(opts, report))
        print(format_table(report), end="")
        print(f"sequential report: {out / 'sequential_report.md'}")
    if opts.push_to_hub:
        if accelerator.is_main_process:
            _warn_of_local_stage_cards(opts, [stage_dir(opts.output_dir, i, c) for i, c in enumerate(stages)])
        push_output(accelerator, opts, out, f"End of training: {len(stages)} stages")
    return 0
