"""Resumable checkpoints that cannot run code and cannot mix runs.

A checkpoint folder `checkpoint-<step>` holds accelerate's (or DeepSpeed's) state, `train_state.json` (the step and
the run's fingerprint) and, written last, `manifest.json` (every file and its size). Before a resume every candidate
is verified: manifest complete, safetensors headers readable, and every pickle-based file made only of plain data
(no global that `torch.load(weights_only=True)` would refuse); the newest intact checkpoint of *this* run is used.
Rank 0 decides from its view of the filesystem and tells the others, so all ranks take the same path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sketch2real.cli import LOCK_FILE, UserError, is_full_disk
from sketch2real.family import CONDITIONING_VERSION, family_of
from sketch2real.io import differences, human_bytes, umask_modes, write_json
from sketch2real.shards import image_folder_data, shards_data
from sketch2real.training.accelerator import checkpoint_kwargs, is_deepspeed, main_process_view

logger = logging.getLogger("sketch2real")

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAIN_STATE, MANIFEST = "train_state.json", "manifest.json"
DEEPSPEED_TAG = "pytorch_model"  # the folder accelerate has DeepSpeed write the model and its ZeRO shards into
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


MISSING = object()  # an option a saved fingerprint does not have


class RunFingerprint(dict):
    """A run's fingerprint (`run_fingerprint`), which knows its options' defaults: a saved fingerprint without an
    option (written by a version before the option existed) is of the same run where this one has it at its default,
    so a job requeued onto an upgraded checkout resumes its checkpoints."""

    def __init__(self, values: dict[str, Any], defaults: dict[str, Any],
                 by_content: dict[str, tuple[str, Any]] | None = None):
        super().__init__(values)
        self.defaults = defaults
        # path options known by their contents (option -> (the contents' key, this run's path)): where they are is no
        # matter, against a fingerprint that knows them by contents too
        self.by_content = by_content or {}

    def sides(self, theirs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(this run, a saved one completed with this run's defaults), compared option by option."""
        mine, theirs = dict(self), dict(theirs)
        for option, (contents, path) in self.by_content.items():
            if contents in theirs:
                theirs.pop(option, None)
            elif option in theirs:  # saved by path (no such contents then, or before they were recorded): by path
                mine[option] = path
        return mine, {**{k: v for k, v in mine.items() if k not in theirs and self.defaults.get(k, MISSING) == v}, **theirs}

    def matches(self, theirs: dict[str, Any] | None) -> bool:
        """Whether a saved fingerprint (None: none saved, an older checkpoint) is of this run."""
        if theirs is None:
            return True
        mine, theirs = self.sides(theirs)
        return mine == theirs

    def differences(self, theirs: dict[str, Any]) -> str:
        """What differs, in the wording of every refusal of another run's outputs (`io.differences`)."""
        return differences(*self.sides(theirs))



def _normalized(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, sort_keys=True, default=str))  # as train_state.json reads back


def run_fingerprint(opts, num_processes: int) -> RunFingerprint:
    """What defines a run (model, data, seed, global batch, schedule...), not how it is launched: a checkpoint
    resumes under any launcher layout with the same global batch. `max_train_steps` counts only where the
    learning-rate schedule depends on it (so a constant-LR run may be extended)."""
    choices = dict(options_fingerprint(opts))
    choices["global_batch_size"] = opts.train_batch_size * num_processes
    if opts.lr_scheduler not in CONSTANT_SCHEDULES:
        choices["max_train_steps"] = opts.max_train_steps
    by_content = {}  # shards and captions by what they hold: copied elsewhere (a node's local disk), the same run
    data = shards_data(getattr(opts, "shard_dir", ""), getattr(opts, "split", ""))
    if data:
        choices["data"] = data
        by_content["shard_dir"] = ("data", choices["shard_dir"])
    defaults = defaults_in_context(opts)
    captions = Path(getattr(opts, "captions", "") or "")
    if captions.is_file():  # the prompts are data too: an edited captions file is another run
        choices["captions_data"] = defaults["captions_data"] = hashlib.sha256(captions.read_bytes()).hexdigest()[:16]
        # (its own default: a checkpoint saved before it was recorded still resumes)
        by_content["captions"] = ("captions_data", choices["captions"])
    # how prompts become conditioning (its default: a checkpoint from before it was recorded resumes)
    choices["conditioning_version"] = defaults["conditioning_version"] = CONDITIONING_VERSION
    if any(getattr(opts, flag, "") for flag in ("instance_data_dir", "train_data_dir")) and family_of(
            opts.pretrained_model_name_or_path, getattr(opts, "revision", None)).told_image_sizes:
        # no default: a checkpoint of a version that told SDXL 256 px of every photo of a folder is another run
        choices["time_ids"] = "each image's own size and crop"
    for flag in ("instance_data_dir", "train_data_dir"):  # a folder of the user's images: edited, another run
        images = image_folder_data(getattr(opts, flag, "") or "")
        if images:
            choices[f"{flag}_data"] = defaults[f"{flag}_data"] = images  # (a checkpoint from before: resumes)
            by_content[flag] = (f"{flag}_data", choices[flag])
    choices = {k: v for k, v in choices.items() if k not in by_content}
    return RunFingerprint(_normalized(choices), _normalized(defaults), _normalized(by_content))


def options_fingerprint(opts, ignored: frozenset[str] = frozenset()) -> RunFingerprint:
    """The options that decide what a run computes (how it executes or reports, and `ignored`, left out: a resume may
    change those), knowing their defaults (an option added since a saved run counts as the same where at its default)."""
    from sketch2real.cli import as_dict, options_affecting

    left_out = options_affecting(type(opts), "runtime") | ignored
    return RunFingerprint(_normalized({k: v for k, v in as_dict(opts).items() if k not in left_out}),
                          _normalized(defaults_in_context(opts)))


def defaults_in_context(opts) -> dict[str, Any]:
    """Each option's default for this run: one resolved from other options (None declared: the learning rate from
    --lora_rank and --optimizer, the resolution from the model's family) as this run would resolve it."""
    import dataclasses

    from sketch2real.cli import as_dict, default_of

    defaults = {}
    for field in dataclasses.fields(opts):
        declared = default_of(field)
        defaults[field.name] = (as_dict(dataclasses.replace(opts, **{field.name: None}))[field.name] if declared is None
                                else declared)
    return defaults


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Finished checkpoints (`checkpoint-N`, never `*.partial`), oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m[1]), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def read_train_state(folder: Path) -> dict | None:
    try:
        state = json.loads((folder / TRAIN_STATE).read_text())
        return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None
    except (OSError, ValueError):
        return None


# The classes DeepSpeed pickles into every ZeRO optimizer file (its loss scaler, ZeRO stage, and ZeRO-1/2's parameter
# slice map): plain data, rebuilt without code of their own (no __reduce__ or __setstate__). Refusing them refused
# every DeepSpeed checkpoint, and a requeued DeepSpeed job started over from step 0.
DEEPSPEED_CHECKPOINT_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
}


def _allowed_globals() -> set[str]:
    """The plain-data globals accelerate itself admits with weights_only=True (numpy arrays in RNG states), and
    DeepSpeed's checkpoint classes."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    return {f"{g.__module__}.{g.__qualname__}" for g in TORCH_SAFE_GLOBALS} | DEEPSPEED_CHECKPOINT_GLOBALS | {
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
        "_codecs.encode", "codecs.encode",
    }


def unsafe_globals(path: Path) -> list[str]:
    """Globals a pickle-based file would import on load beyond plain data; ["not a torch checkpoint"] if unreadable."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # not a torch zip file: a raw pickle, cut short, or garbage
        return [f"unreadable as a torch file ({type(err).__name__})"]
    allowed = _allowed_globals()
    return [g for g in found if g not in allowed and not g.startswith("numpy.dtypes.")]


def verify_checkpoint(folder: Path) -> str:
    """Why `folder` must not be resumed from, or "" when it is intact and holds only data."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST} (cut short while saving, or written by an older version)"
    if read_train_state(folder) is None:
        return f"no readable {TRAIN_STATE}"
    listed = set(manifest.get("files", {}))
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if name.startswith("custom_checkpoint_"):
            return f"{name}: accelerate would unpickle it with weights_only=False; refused"
        if path.suffix in PICKLE_SUFFIXES:
            if name not in listed:
                return f"{name} was not written by the run (not in {MANIFEST}); refused"
            unsafe = unsafe_globals(path)
            if unsafe:
                return f"{name} would run code on load ({', '.join(unsafe[:3])}); refused"
        elif path.suffix == ".safetensors" and name in listed:
            # what a resume reads; a file written after the manifest (a LoRA run's copy of its adapters) is not, and
            # a kill while writing it does not cost the checkpoint
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception as err:
                return f"{name} is not a readable safetensors file ({type(err).__name__})"
    return ""


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights a run validates and saves, at a checkpoint's step, read from its files: fp32, named as the trained
    module's parameters; the --use_ema average where the checkpoint holds it whole (1 process, DDP), else the trained
    weights, from accelerate's file or a DeepSpeed ZeRO-2/3 checkpoint (DeepSpeed's own reader). One line where an
    average lives in per-process optimizer state (schedule-free AdamW's; the EMA under DeepSpeed)."""
    from safetensors.torch import load_file

    problem = verify_checkpoint(folder)
    if problem:
        raise UserError(f"cannot read {folder}: {problem}")
    if read_train_state(folder)["fingerprint"].get("optimizer") == "adamw_schedulefree" or any(folder.glob("ema-*")):
        raise UserError(f"{folder} keeps its averaged weights (schedule-free AdamW's, or the EMA under DeepSpeed) "
                        "in each process's optimizer state: generate from the run's output, or from a LoRA run's checkpoint")
    for name in ("ema.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return load_file(str(folder / name))
    if (folder / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # its progress lines
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)
    raise UserError(f"{folder} holds no trained weights (neither accelerate's model.safetensors nor a DeepSpeed checkpoint)")


def launch_of(accelerator) -> dict:
    """How a run is launched, as far as its checkpoints care: DeepSpeed's are partitioned per process, by ZeRO stage,
    and hold the optimizer that offload chose (DeepSpeed's CPU Adam, or the torch one)."""
    launch = {"num_processes": accelerator.num_processes, "deepspeed": is_deepspeed(accelerator)}
    if launch["deepspeed"]:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        launch["zero_stage"] = int(zero.get("stage", 0))
        launch["offload_optimizer"] = (zero.get("offload_optimizer") or {}).get("device", "none") or "none"
    return launch


def recorded_launch(folder: Path) -> dict | None:
    """A checkpoint's launch (`launch_of` as saved); one saved before the ZeRO stage was recorded tells stage 3 from
    the others by its files (ZeRO-3 partitions the model states too: `zero_pp_rank_*_model_states.pt`)."""
    launch = (read_train_state(folder) or {}).get("launch")
    if isinstance(launch, dict) and launch.get("deepspeed") and "zero_stage" not in launch and (folder / DEEPSPEED_TAG).is_dir():
        launch = {**launch, "zero3_layout": any((folder / DEEPSPEED_TAG).glob("zero_pp_rank_*_model_states.pt"))}
    return launch


def launch_problem(saved: dict | None, now: dict) -> str:
    """Why a checkpoint saved under launch `saved` cannot resume under `now` ("" if it can). DDP and 1-process
    checkpoints hold whole tensors and resume on any number of processes (the schedule and the data order
    are functions of global steps); DeepSpeed ZeRO's are partitioned by process."""
    if not saved or saved == now:
        return ""
    if saved["deepspeed"] != now["deepspeed"]:
        kind = "with DeepSpeed" if saved["deepspeed"] else "without DeepSpeed"
        return f"it was saved {kind}: resume it with the same kind of launcher (accelerate config)"
    if saved["deepspeed"] and saved["num_processes"] != now["num_processes"]:
        return (f"it is a DeepSpeed ZeRO checkpoint of {saved['num_processes']} processes (partitioned by process) and "
                f"this run has {now['num_processes']}: resume it on {saved['num_processes']} processes")
    if "zero3_layout" in saved and saved["zero3_layout"] != (now.get("zero_stage") == 3):
        return (f"it was saved {'with' if saved['zero3_layout'] else 'without'} ZeRO stage 3 and this run has stage "
                f"{now.get('zero_stage')}: resume it with the DeepSpeed config that saved it")
    for key, what in (("zero_stage", "ZeRO stage"), ("offload_optimizer", "optimizer offload")):
        if key in saved and saved[key] != now.get(key):  # (a checkpoint saved before they were recorded: not known)
            return (f"it was saved with {what} {saved[key]} and this run has {now.get(key)}: resume it with the "
                    "DeepSpeed config that saved it")
    return ""


def _decide_resume(output_dir: Path, resume: str | None, fingerprint: RunFingerprint,
                   launch: dict, quiet: bool = False) -> tuple[str | None, str | None]:
    """(checkpoint to resume from or None, one-line error or None); rank 0 runs it. `quiet`: no warning for a damaged
    checkpoint passed over (an early look; the decision itself says it)."""
    path, error = _choose_checkpoint(output_dir, resume, fingerprint, launch["num_processes"], quiet)
    if path is not None:
        problem = launch_problem(recorded_launch(Path(path)), launch)
        if problem:
            return None, f"cannot resume from {path}: {problem}"
    return path, error


def _same_global_batch(theirs: dict, mine: dict, num_processes: int, launch: dict | None) -> str:
    """How a run requeued on another number of processes gets back the global batch a checkpoint was trained with
    ("" where that is not what differs); `launch`: the checkpoint's (a ZeRO checkpoint resumes on its own count only)."""
    batch = theirs.get("global_batch_size")
    if not isinstance(batch, int) or batch == mine.get("global_batch_size"):
        return ""
    if launch and launch.get("deepspeed") and launch.get("num_processes") != num_processes:
        return f"it is a DeepSpeed ZeRO checkpoint of {launch['num_processes']} processes: resume it on those, or "
    if batch % num_processes:
        return f"its global batch of {batch} needs a number of processes that divides it, or "
    return f"on {num_processes} process(es) --train_batch_size {batch // num_processes} keeps its global batch of {batch}; or "


def _longer_schedule(fingerprint: RunFingerprint, theirs: dict) -> str:
    """Why a run given another --max_train_steps is another run where it is ("" where not): its schedule spreads the
    learning rates over the steps (a constant one continues, and its fingerprint leaves the count out)."""
    mine, saved = fingerprint.sides(theirs)
    if "max_train_steps" not in mine or saved.get("max_train_steps", mine["max_train_steps"]) == mine["max_train_steps"]:
        return ""
    return (f"--lr_scheduler {mine.get('lr_scheduler')} spreads its learning rates over --max_train_steps, so those "
            "checkpoints are of a run with other rates (a constant schedule's run continues); ")


def _choose_checkpoint(output_dir: Path, resume: str | None, fingerprint: RunFingerprint,
                       num_processes: int = 1, quiet: bool = False) -> tuple[str | None, str | None]:
    own, foreign = [], []
    for step, folder in list_checkpoints(output_dir):
        state = read_train_state(folder)
        if state is not None and not fingerprint.matches(state.get("fingerprint")):
            foreign.append((folder, state))
        else:
            own.append((step, folder))
    if foreign:
        folder, state = foreign[-1]
        theirs = state["fingerprint"]
        return None, (f"{output_dir} holds checkpoints of another run ({folder.name}: {fingerprint.differences(theirs)}): "
                      f"{_same_global_batch(theirs, fingerprint, num_processes, state.get('launch'))}"
                      f"{_longer_schedule(fingerprint, theirs)}use another "
                      "--output_dir, or remove them to start over")
    if not resume:
        return None, None
    if resume != "latest":
        path = Path(resume) if Path(resume).is_dir() else output_dir / resume
        if not path.is_dir():
            return None, f"checkpoint not found: {resume}"
        problem = verify_checkpoint(path)
        if problem:
            return None, f"checkpoint {path} cannot be resumed: {problem}"
        theirs = (read_train_state(path) or {}).get("fingerprint")
        if not fingerprint.matches(theirs):  # another folder's checkpoint, as strictly as one of this folder's
            return None, (f"checkpoint {path} is of another run ({fingerprint.differences(theirs)}): "
                          f"{_longer_schedule(fingerprint, theirs)}resume it with the settings it was trained with")
        return str(path), None
    problems = []
    for _, folder in reversed(own):
        problem = verify_checkpoint(folder)
        if not problem:
            return str(folder), None
        if not quiet:
            logger.warning("%s is not intact (%s): trying the previous checkpoint", folder, problem)
        problems.append(f"{folder.name}: {problem}")
    if problems:  # a requeued job must not silently start over (and later prune) a run it cannot read
        return None, (f"none of the {len(problems)} checkpoints in {output_dir} can be resumed ({problems[0]}): "
                      "remove them to start over")
    return None, None


# options of how a job runs, not of what it writes: a resubmitted job may change them and still find its run finished
RERUN_ONLY = frozenset({"resume_from_checkpoint", "output_dir", "dataloader_num_workers", "logging_steps", "ddp_timeout",
                        "checkpointing_steps", "checkpoints_total_limit", "torch_compile", "torch_compile_mode",
                        "torch_compile_backend", "report_to", "logging_dir", "tracker_project_name", "push_to_hub",
                        "hub_model_id", "train_batch_size"})


def output_files(out: Path) -> dict[str, int]:
    """The trained outputs in `out` (relative path -> bytes), as `metrics.json` records them: not checkpoints, caches,
    logs and validation mosaics (which a resume rewrites), nor the summary and card written after it."""
    def output(path: Path) -> bool:
        first = path.relative_to(out).parts[0]
        return not (first.startswith("checkpoint-") or first in ("latent_cache", "logs", "validation", "metrics.json",
                                                                   "README.md", "PREEMPTED", LOCK_FILE) or ".partial" in first)

    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file() and output(p)}


def finished_run(accelerator, opts) -> bool:
    """Whether `--resume_from_checkpoint latest` finds this run finished in `--output_dir`: its `metrics.json`, written
    after the trained model, records this run's fingerprint at `--max_train_steps` and the outputs that are still
    there (`output_files`), its `run_config.json` the same options (but `RERUN_ONLY`'s), and its card is there (a resubmitted pipeline trained the steps since the last
    checkpoint again and rewrote the outputs). Decided by rank 0 for all ranks, before any weight loads;
    `--push_to_hub` trains and pushes as asked."""
    if opts.resume_from_checkpoint != "latest" or getattr(opts, "push_to_hub", False):
        return False
    from sketch2real.cli import as_dict

    out = Path(opts.output_dir)
    fingerprint = run_fingerprint(opts, accelerator.num_processes)
    # every option as the run recorded it, but those of how a job runs: another output format, precision or
    # validation prompt asks for outputs the finished run did not write
    now = _normalized({k: v for k, v in {**as_dict(opts), "mixed_precision": accelerator.mixed_precision}.items()
                       if k not in RERUN_ONLY})

    def decide() -> bool:
        try:
            summary = json.loads((out / "metrics.json").read_text())
            recorded = json.loads((out / "run_config.json").read_text())
        except (OSError, ValueError):
            return False
        saved = summary.get("fingerprint") if isinstance(summary, dict) else None
        return (summary.get("steps") == opts.max_train_steps and saved is not None and fingerprint.matches(saved)
                and {k: v for k, v in recorded.items() if k not in RERUN_ONLY} == now
                and (out / "README.md").is_file()  # the card: the last of its outputs
                and bool(summary.get("outputs")) and output_files(out) == summary["outputs"])  # none removed or cut

    finished = main_process_view(accelerator, decide)
    if finished and accelerator.is_main_process:
        print(f"{out} holds this run's trained model ({opts.max_train_steps} steps, its metrics.json): nothing to train "
              "(to train it again: another --output_dir, or without --resume_from_checkpoint)", flush=True)
    return finished


def past_the_end(checkpoint: str | os.PathLike, step: int, max_train_steps: int) -> str:
    """The refusal of a checkpoint past `--max_train_steps`: its data order and schedule would run backwards."""
    return (f"{checkpoint} is at step {step}, past --max_train_steps {max_train_steps}: give at least {step}, or another "
            "--output_dir for a shorter run")


def check_resume(accelerator, opts) -> None:
    """Before any weight loads (and after `finished_run`, which takes a finished run under any launch), the refusals
    `resolve_resume` would make after loading and `prepare` (minutes for a large model): another run's checkpoints in
    `--output_dir`, a `--resume_from_checkpoint` of another run, none resumable, or one saved under a launch this one
    cannot resume (`launch_problem`), or one past `--max_train_steps`. `resolve_resume` chooses for good after
    `prepare`."""
    fingerprint = run_fingerprint(opts, accelerator.num_processes)

    def look() -> None:
        path, error = _decide_resume(Path(opts.output_dir), opts.resume_from_checkpoint, fingerprint,
                                     launch_of(accelerator), quiet=True)
        if error:
            raise UserError(error)
        step = (read_train_state(Path(path)) or {}).get("step") if path else None
        if isinstance(step, int) and step > opts.max_train_steps:  # (a constant schedule's count is no fingerprint's)
            raise UserError(past_the_end(path, step, opts.max_train_steps))

    main_process_view(accelerator, look)


def resolve_resume(accelerator, output_dir: str | os.PathLike, resume: str | None, fingerprint: RunFingerprint) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), decided by rank 0 for all ranks.

    'latest' is the newest intact checkpoint of this run (older ones are tried in turn, with a warning);
    a folder holding another run's checkpoints is refused in one line naming what differs.
    """
    def decide() -> Path | None:
        path, error = _decide_resume(Path(output_dir), resume, fingerprint, launch_of(accelerator))
        if error:
            raise UserError(error)
        return path

    path = main_process_view(accelerator, decide)
    return Path(path) if path else None


def _any_failed(accelerator, failed: bool) -> bool:
    if accelerator.num_processes == 1:
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _save_failed(out: Path, partial: Path, step: int, err: BaseException | None) -> UserError:
    """The one-line error of a failed save (the `.partial` folder is removed, older checkpoints kept)."""
    previous = list_checkpoints(out)
    needed = max(_folder_bytes(previous[-1][1]) if previous else 0, _folder_bytes(partial))
    shutil.rmtree(partial, ignore_errors=True)
    free = shutil.disk_usage(out).free if out.is_dir() else 0
    # torch.save's C++ writer says a full disk as "basic_ios::clear: iostream error": the space left decides too
    if err is not None and not is_full_disk(err) and free >= needed:
        said = next((line.strip() for line in str(err).splitlines() if line.strip()), "no message")  # may start with "\n"
        return UserError(f"saving checkpoint-{step} in {out} failed ({type(err).__name__}: {said}); "
                         "earlier checkpoints are kept")
    return UserError(f"no space left in {out} to save checkpoint-{step} (about {human_bytes(needed)} needed, "
                     f"{human_bytes(free)} free; the oldest checkpoint goes once the new one is complete): free space, "
                     "lower --checkpoints_total_limit or use another --output_dir; earlier checkpoints are kept")


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None,
                    fingerprint: RunFingerprint, extra: Callable[[Path], None] | None = None,
                    state: dict | None = None) -> Path:
    """Save a full training state as `checkpoint-<step>`; a kill mid-save leaves only a `.partial` folder.
    `extra(folder)`: what else each process writes into it (the EMA), before the manifest lists the files; `state`:
    values of the loop its train_state.json keeps beside the step (the last loss read).

    A full disk (on any rank) is one line on every rank and no `.partial` folder. Pruning keeps the newest
    `total_limit` checkpoints of this run (never the one just written, never another run's).
    """
    out = Path(output_dir)
    final, partial = out / f"checkpoint-{step}", out / f"checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    error: BaseException | None = None
    try:
        accelerator.save_state(str(partial), **checkpoint_kwargs(accelerator, saving=True))
        if extra is not None:
            extra(partial)
    except (OSError, RuntimeError) as err:
        error = err
    # A collective: every rank has written its own files (random states, ZeRO shards) before rank 0 lists them in
    # the manifest; without it a slower rank's file could land after the listing, and the checkpoint be refused.
    failed = _any_failed(accelerator, error is not None)
    if accelerator.is_main_process and not failed:
        try:
            umask_modes(partial)  # safetensors' writer makes 0600 files: a group's colleague could not resume them
            write_json(partial / TRAIN_STATE, {"step": step, "fingerprint": fingerprint, "launch": launch_of(accelerator),
                                               "trained_weights": trained_weights_digest(accelerator), **(state or {})})
            files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
            write_json(partial / MANIFEST, {"step": step, "files": files})  # last: its presence means complete
        except OSError as err:
            error = err
    if failed or _any_failed(accelerator, error is not None):
        failure = _save_failed(out, partial, step, error) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        raise failure or UserError(f"saving checkpoint-{step} in {out} failed on another process (see its message)")
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for leftover in out.glob("checkpoint-*.partial"):  # a save cut short by a kill: never resumable
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
                logger.info("removed %s (a save that was cut short)", leftover)
        if total_limit:
            mine = [folder for _, folder in list_checkpoints(out)
                    if folder != final and fingerprint.matches((read_train_state(folder) or {}).get("fingerprint", {}))]
            for old in mine[: max(0, len(mine) - (total_limit - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def trained_weight_names(accelerator) -> list[list[str]]:
    """The names of the weights a checkpoint holds, per prepared model in order: its parameters that train
    (`training.accelerator._checkpoint_only_trained_weights` leaves out the frozen ones)."""
    return [[name for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
            for model in getattr(accelerator, "_models", [])]  # (accelerate's list of the prepared models)


def trained_weights_digest(accelerator) -> str:
    """`trained_weight_names` in 16 hex digits: what train_state.json records to compare at resume."""
    return hashlib.sha256(json.dumps(trained_weight_names(accelerator)).encode()).hexdigest()[:16]


def check_trained_weight_names(accelerator, folder: Path) -> None:
    """One line where a checkpoint's weights are named otherwise than this version's model names what it trains (a
    renamed module: loading is not strict, as frozen weights are left out, so they were dropped without a word and
    training went on from fresh adapters at the checkpoint's step). By the digest train_state.json records, or for
    a checkpoint without one, by the names in its model files (DeepSpeed's are not read)."""
    recorded = (read_train_state(folder) or {}).get("trained_weights")
    if recorded is not None:
        differ = recorded != trained_weights_digest(accelerator)
        example = ""
    else:
        from safetensors import safe_open

        differ, example = False, ""
        for i, names in enumerate(trained_weight_names(accelerator)):
            file = folder / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            if not file.is_file():
                continue
            with safe_open(str(file), "pt") as f:
                missing = sorted(set(names) - set(f.keys()))
            if missing:
                differ, example = True, f"; e.g. {missing[0]!r} is not in it ({len(missing)} of {len(names)})"
                break
    if differ:
        raise UserError(f"{folder} holds trained weights named otherwise than this version's model names them (saved by "
                        f"another version{example}): resume it with the version that saved it, or start over in "
                        "another --output_dir")


def load_checkpoint(accelerator, folder: Path) -> int:
    """Restore a verified checkpoint of `save_checkpoint`; returns its step. Frozen weights come from the base model."""
    check_trained_weight_names(accelerator, folder)
    try:
        accelerator.load_state(str(folder), **checkpoint_kwargs(accelerator, saving=False))
    except ValueError as err:  # torch's optimizer: "... a different number of parameter groups" (or of parameters)
        if "parameter group" not in str(err):
            raise
        raise UserError(f"{folder} holds an optimizer state of other parameter groups than this version makes (since "
                        "full SD3/FLUX.1 text encoders train in a group of their own): resume it with the version that "
                        "saved it, or start over in another --output_dir") from err
    return int(read_train_state(folder)["step"])
