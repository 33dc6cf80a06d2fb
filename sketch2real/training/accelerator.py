"""Accelerator setup (precision, gloo on CPU, trackers, DeepSpeed batch size), the casting rule for
modules of mixed dtypes, and reading trained weights out of DDP/DeepSpeed (ZeRO-2/3) alike."""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar

import torch

from sketch2real.cli import UserError, check_output_dir, default_of, lock_output_dir, log_to_stderr

logger = logging.getLogger("sketch2real")
T = TypeVar("T")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def make_accelerator(opts, train_batch_size: int | None = None):
    """An `accelerate.Accelerator` for `opts` (a TrainOptions), usable on CUDA clusters and on CPU.

    On CPU the process group uses gloo, so DDP and DeepSpeed run with several CPU
    processes (tests). fp16 needs CUDA; bf16 works on both. The precision actually used (under DeepSpeed: what its
    config enables) is `accelerator.mixed_precision`; `opts` is left as parsed.
    """
    import accelerate.utils
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    cpu_forced = _env_true("ACCELERATE_USE_CPU")
    deepspeed = _env_true("ACCELERATE_USE_DEEPSPEED")
    if cpu_forced and deepspeed:
        raise UserError.on_every_rank("a DeepSpeed config was given with ACCELERATE_USE_CPU set, which silently turns "
                                      "DeepSpeed off: unset ACCELERATE_USE_CPU (DeepSpeed runs on CPU without it)")
    on_cpu = not torch.cuda.is_available() or cpu_forced
    from sketch2real.models import requested_precision

    precision = requested_precision(opts.mixed_precision)
    if on_cpu and precision == "fp16":
        raise UserError.on_every_rank("mixed precision fp16 needs a CUDA device; use bf16 or no on CPU")
    # every trainer's first use of it: a file, an unwritable folder or the base model's own is one line
    check_output_dir(opts.output_dir, not_into=getattr(opts, "pretrained_model_name_or_path", ""))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    settings = deepspeed_settings(opts, train_batch_size)
    if deepspeed:  # before accelerate reads it: a precision it contradicts is accelerate's traceback there
        defaults = deepspeed_settings(SimpleNamespace(**{f.name: default_of(f) for f in dataclasses.fields(opts)}))
        check_deepspeed_config(os.environ, settings, defaults, opts.mixed_precision, world_size)
    group = {"backend": "gloo"} if on_cpu and distributed else {}
    # DDP's gradients as views of its reduction buckets: no second copy of every gradient (3.4 GB for SD 1.5's UNet)
    kwargs_handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=opts.ddp_timeout), **group),
                       DistributedDataParallelKwargs(gradient_as_bucket_view=True)]
    report_to = None if opts.report_to == "none" else opts.report_to
    if report_to in ("tensorboard", "wandb") and not getattr(accelerate.utils, f"is_{report_to}_available")():
        # accelerate would only warn and log nowhere
        raise UserError.on_every_rank(f"--report_to {report_to}: {report_to} is not installed (pip install {report_to}), or use "
                        "--report_to none")
    accelerator = Accelerator(
        # told, as ACCELERATE_USE_CPU would tell it: on a machine without GPUs a GPU config's processes (torchrun's
        # LOCAL_RANK) find no backend and each runs alone; not under DeepSpeed, which `cpu` turns off
        cpu=on_cpu and not deepspeed,
        mixed_precision=opts.mixed_precision,  # None: accelerate's own setting
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=opts.output_dir, logging_dir=str(Path(opts.output_dir) / opts.logging_dir)),
        kwargs_handlers=kwargs_handlers,
    )
    if on_cpu and accelerator.mixed_precision == "fp16":
        raise UserError.on_every_rank("mixed precision fp16 (from the DeepSpeed config) needs a CUDA device; use bf16 or no on CPU")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config.update(settings)
    if opts.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    log_to_stderr(logging.INFO if accelerator.is_main_process else logging.WARNING, "%(asctime)s %(levelname)s %(message)s")
    _checkpoint_only_trained_weights(accelerator)
    check_shared_folder(accelerator, opts.output_dir)
    return accelerator


def deepspeed_settings(opts, train_batch_size: int | None = None) -> dict:
    """What the trainer's options set in the DeepSpeed config: the micro batch (no DataLoader goes through
    prepare(), so DeepSpeed cannot infer it), accumulation, and clipping (0 turns DeepSpeed's off too: the
    shipped configs clip at 1.0)."""
    return {"train_micro_batch_size_per_gpu": train_batch_size or opts.train_batch_size,
            "gradient_accumulation_steps": opts.gradient_accumulation_steps,
            "gradient_clipping": float(opts.max_grad_norm)}


# the DeepSpeed config's keys the trainer's flags set (`deepspeed_settings`), and the accelerate config's (YAML) own
DEEPSPEED_FLAGS = {"train_micro_batch_size_per_gpu": "--train_batch_size",
                   "gradient_accumulation_steps": "--gradient_accumulation_steps", "gradient_clipping": "--max_grad_norm"}
YAML_DEEPSPEED_KEYS = {"gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                       "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING"}


def _number(value) -> float | None:
    """A config's number (None: "auto", absent, null, or not a number: DeepSpeed's to judge)."""
    try:
        return None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def check_deepspeed_config(env: Mapping[str, str], settings: dict, defaults: dict, mixed_precision: str | None,
                           num_processes: int) -> None:
    """One line where the DeepSpeed setup says otherwise than the trainer, which decides batch, accumulation,
    clipping, precision, optimizer and schedule from its flags (and records them in run_config.json).

    `env`: the launch's environment (accelerate passes the YAML's `deepspeed_config` and a `deepspeed_config_file`
    through it); `settings`: `deepspeed_settings` of this run, `defaults`: of the options' defaults (the shipped
    YAMLs' accumulation 1 and clipping 1.0: only a YAML value edited away from them is the user's word). A user's JSON
    value other than "auto" was replaced silently, an "optimizer" block was a traceback, a "scheduler" block ran beside
    the trainer's schedule (WarmupLR set step 1's rate to 0), a precision it turns on or off won over the flag."""
    import json

    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    try:
        config = json.loads(Path(path).read_text()) if path != "none" else {}
    except (OSError, ValueError):  # accelerate reads it too: what it says of it stands
        config = {}
    config = config if isinstance(config, dict) else {}
    where = f"the DeepSpeed config {path}"
    for key, flag in DEEPSPEED_FLAGS.items():
        if key in YAML_DEEPSPEED_KEYS and path == "none":
            value = _number(env.get(YAML_DEEPSPEED_KEYS[key]))
            if value is not None and value not in (settings[key], defaults[key]):
                raise UserError.on_every_rank(
                    f"the accelerate config sets deepspeed_config {key} {value:g}, the trainer's {flag} is "
                    f"{settings[key]:g}: give {flag} {value:g} (the flags decide; run_config.json records them)")
        value = _number(config.get(key))
        if value is not None and value != float(settings[key]):
            raise UserError.on_every_rank(f"{where} sets {key} {value:g}, the trainer's {flag} is {settings[key]:g}: "
                                          f"give {flag} {value:g}, or \"auto\" there (the flags decide; "
                                          "run_config.json records them; checkpoints saved before this check trained "
                                          "with the flag's: \"auto\" resumes them)")
    batch = settings["train_micro_batch_size_per_gpu"] * settings["gradient_accumulation_steps"] * num_processes
    if _number(config.get("train_batch_size")) not in (None, batch):
        raise UserError.on_every_rank(f"{where} sets train_batch_size {config['train_batch_size']}, the trainer's global "
                                      f"batch is {batch} (--train_batch_size x --gradient_accumulation_steps x "
                                      f"{num_processes} processes): set it to \"auto\"")
    for block, flags in (("optimizer", "--optimizer, --learning_rate, --adam_*"),
                         ("scheduler", "--lr_scheduler, --lr_warmup_steps")):
        if block in config:
            raise UserError.on_every_rank(f"{where} has a block \"{block}\": the trainer makes its own ({flags}); remove "
                                          "it there")
    said = {kind: str((config.get(kind) or {}).get("enabled", "auto")).lower() for kind in ("bf16", "fp16")}
    on = [kind for kind, v in said.items() if v == "true"]
    requested = mixed_precision or env.get("ACCELERATE_MIXED_PRECISION") or "no"
    source = f"--mixed_precision {mixed_precision}" if mixed_precision else f"accelerate's mixed_precision {requested}"
    if on and (requested not in ("no", on[0]) or mixed_precision == "no"):
        raise UserError.on_every_rank(f"{source}, but {where} enables {on[0]}: give --mixed_precision {on[0]}, or "
                                      "\"enabled\": \"auto\" there")
    if said.get(requested) == "false":
        raise UserError.on_every_rank(f"{source}, but {where} turns {requested} off (the run would be fp32): set its "
                                      "\"enabled\" to \"auto\" there, or give --mixed_precision no")


def main_process_view(state, look: Callable[[], T]) -> T:
    """`look()` run on the main process only, its result on every process (a collective; `state`: an Accelerator or
    a PartialState). One view of the filesystem or the hub for all: ranks looking at their own time could see other
    files and then take other collectives. A `UserError` it raises is raised on every process, so all stop with the
    same line."""
    from accelerate.utils import broadcast_object_list

    result = [None, None]  # [value, error message]
    if state.is_main_process:
        try:
            result[0] = look()
        except UserError as err:
            result[1] = str(err)
    if state.num_processes > 1:
        broadcast_object_list(result)
    if result[1] is not None:
        raise UserError.on_every_rank(result[1])
    return result[0]


def check_shared_folder(state, folder: str | os.PathLike, flag: str = "--output_dir") -> None:
    """One line on every process when `folder` is not one folder for all of them (node-local disks on a
    multi-node job): rank 0 leaves a token file there, every rank looks for it; or when another job holds it
    (`lock_output_dir`). `state`: an Accelerator or a
    PartialState. Checkpoints, PREEMPTED and the outputs assume a folder every rank sees."""
    from accelerate.utils import broadcast_object_list, gather_object

    main_process_view(state, lambda: lock_output_dir(folder, flag))  # and it is this job's alone
    if state.num_processes == 1:
        return
    token = [f".shared-check-{uuid.uuid4().hex}" if state.is_main_process else None]
    broadcast_object_list(token)
    path = Path(folder) / token[0]
    if state.is_main_process:
        path.write_text("")
    state.wait_for_everyone()
    blind = [rank for rank, sees in enumerate(gather_object([path.exists()])) if not sees]
    state.wait_for_everyone()
    if state.is_main_process:
        path.unlink(missing_ok=True)
    if blind:  # every rank gathered the same list
        raise UserError.on_every_rank(f"{flag} {folder} is not shared: process(es) {blind} do not see what process 0 writes there "
                        "(a node-local disk?); use a folder on storage every node mounts")


def distributed_state(timeout_seconds: int):
    """accelerate's `PartialState` for the inference scripts, with the collective timeout of `--ddp_timeout`.

    Without a GPU (or with ACCELERATE_USE_CPU) it must be told `cpu=True`, as `Accelerator` is: otherwise each of
    N launched processes believes it is alone (rank 0 of 1) and does all the work.
    """
    from accelerate import PartialState

    cpu = _env_true("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_seconds))


@contextmanager
def training_session(opts) -> Iterator:
    """`make_accelerator(opts)`, ended (trackers finished, process group destroyed) once, when the script is done.

    SIGUSR1/SIGTERM are caught from here on; a long phase that stops for them (`Preempted`: latent caching,
    class-image generation) leaves PREEMPTED and ends the process with status 75, so Slurm requeues the job.
    """
    from sketch2real.training.hub import check_hub_repo
    from sketch2real.training.preemption import PREEMPTED_EXIT_CODE, Preempted, mark_preempted, preemption

    preemption.install()
    accelerator = make_accelerator(opts)
    try:
        check_hub_repo(opts, accelerator)  # --push_to_hub: no login or network fails now, not after the training
        yield accelerator
    except Preempted as stop:
        mark_preempted(accelerator, opts.output_dir, f"stopped before the next checkpoint ({stop})")
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    else:
        accelerator.wait_for_everyone()  # no rank leaves while another still saves (see cli.leave_process_group)
    finally:
        accelerator.end_training()


def finish_trackers(accelerator) -> None:
    """End this run's trackers but keep the process group (sequential stages run several loops)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def _checkpoint_only_trained_weights(accelerator) -> None:
    """Checkpoints hold what training changes (trained weights, optimizer, scheduler, RNG), not frozen weights
    that the base model already has: a LoRA or TI checkpoint is megabytes, not a second copy of the UNet."""

    def drop_frozen(models, weights, output_dir) -> None:
        for i, (model, state) in enumerate(zip(models, weights)):
            frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
            weights[i] = {k: v for k, v in state.items() if k not in frozen}

    accelerator.register_save_state_pre_hook(drop_frozen)


def checkpoint_kwargs(accelerator, saving: bool) -> dict:
    """Keyword arguments of `save_state`/`load_state` that go with `_checkpoint_only_trained_weights`."""
    if is_deepspeed(accelerator):
        return {"exclude_frozen_parameters": True} if saving else {"load_module_strict": False}
    return {} if saving else {"strict": False}


def configure_attention(unet, opts, device: torch.device) -> None:
    """SDPA (diffusers' default) or, with --enable_xformers_memory_efficient_attention, xformers (CUDA only)."""
    if opts.enable_xformers_memory_efficient_attention:
        from sketch2real.models import enable_xformers

        enable_xformers(unet, device)


def compile_in_place(modules: list[torch.nn.Module], regions: bool, mode: str = "default",
                     backend: str = "inductor") -> None:
    """--torch_compile: compile each module in place (`Module.compile`: parameter names unchanged, so checkpoints and
    saved weights read as eager's), whole, or with `regions` by repeated block where diffusers declares them
    (`_repeated_blocks`: one compile per block type; the family says which, `Family.compile_regions`). Shapes are
    static: a step's batch never changes shape, and a new shape compiles once more rather than switching to slower
    dynamic code. `mode`, `backend`: torch.compile's ("reduce-overhead": CUDA graphs, the host launches a step in a few
    calls)."""
    options = dict(dynamic=False, backend=backend, mode=None if mode == "default" else mode)
    for module in modules:
        if getattr(module, "_s2r_compiled", False):
            continue  # a later stage of the same model (sequential DreamBooth)
        if regions and getattr(module, "_repeated_blocks", None):
            module.compile_repeated_blocks(**options)
        else:
            module.compile(**options)
        module._s2r_compiled = True


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def cudagraph_skips() -> int:
    """Graphs inductor left without CUDA graphs under `--torch_compile_mode reduce-overhead` (it says so only in logs)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


@contextmanager
def eager_mode() -> Iterator[None]:
    """Compiled modules run eagerly in the block: validation, held-out losses and generation (eval mode, no grad,
    other batch shapes) would otherwise compile graphs of their own between training steps."""
    with torch.compiler.set_stance("force_eager"):
        yield


def is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def innermost_optimizer(optimizer):
    """The torch optimizer under accelerate's and DeepSpeed's wrappers (DeepSpeed's steps its fp32 master partitions)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_sharded(accelerator) -> bool:
    """Whether each process steps only its own part of the optimizer state (DeepSpeed ZeRO over several processes)."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage >= 1 and accelerator.num_processes > 1


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's floating-point parameters (what DeepSpeed or `.to(weight_dtype)` made them)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _cast_floats(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def cast_denoiser_inputs(denoiser: torch.nn.Module) -> None:
    """Cast every floating input of a UNet or ControlNet to its parameters' dtype on entry, in training,
    held-out losses and validation pipelines alike; the timestep (2nd argument) stays as given.

    The rule that makes every precision and launcher work: DDP/1-process AMP keeps trained
    weights in fp32 (autocast computes in bf16/fp16), frozen modules sit in the weight dtype
    and see no autocast outside a prepared forward, and DeepSpeed casts its whole module to
    bf16/fp16 without autocast (it casts only positional inputs, only with fp16 auto_cast).
    Timesteps keep full precision: bf16 cannot even hold 999.
    """

    def hook(module, args, kwargs):
        dtype = module_dtype(module)
        args = tuple(a if i == 1 else _cast_floats(a, dtype) for i, a in enumerate(args))
        kwargs = {k: v if k == "timestep" else _cast_floats(v, dtype) for k, v in kwargs.items()}
        return args, kwargs

    denoiser.register_forward_pre_hook(hook, with_kwargs=True)


def trained_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the trained parameters of a prepared `model`, named as in the unwrapped module.

    Under DeepSpeed these are the optimizer's fp32 master weights, gathered from every rank
    (ZeRO-2 and ZeRO-3 alike, also for parameters ZeRO-3 partitioned), so a saved LoRA, TI
    row or fine-tuned model is what a 1-process run saves. A collective under DeepSpeed:
    every rank must call it. Only rank 0 gets the copies (the others: {}), as only rank 0 writes.
    """
    unwrapped = accelerator.unwrap_model(model)
    state = {}
    for name, param in unwrapped.named_parameters():
        if not param.requires_grad:
            continue
        tensor = None
        if is_deepspeed(accelerator):
            from deepspeed.utils import safe_get_full_fp32_param

            tensor = safe_get_full_fp32_param(param)  # every rank takes part in the gather
        if not accelerator.is_main_process:
            continue  # only rank 0 writes: no full copy on the others (a full SDXL UNet is 10 GB per rank)
        if tensor is None:
            tensor = param.detach()
        state[name] = tensor.float().cpu().clone()
    return state


def fp32_trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters' fp32 values before `prepare` (references, no copy): DeepSpeed casts its module
    to bf16/fp16 and replaces the parameters' data, so these stay the exact starting weights."""
    return {name: p.data for name, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float32}


def restore_fp32_masters(accelerator, model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Give DeepSpeed's fp32 master weights the exact starting values.

    DeepSpeed bf16/fp16 builds its fp32 masters from the module it has already cast, so without this
    training starts from bf16-rounded weights (a relative error of 2^-9 on every weight, larger than many
    fine-tuning updates); with it, ZeRO-2/3 train the same fp32 weights as 1 process and DDP.
    """
    if not is_deepspeed(accelerator) or accelerator.mixed_precision == "no":
        return
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in accelerator.unwrap_model(model).named_parameters():
        if name in values:
            safe_set_full_fp32_param(param, values[name].to(accelerator.device))


def partition_before_prepare(accelerator, model: torch.nn.Module) -> None:
    """Under ZeRO-3, shard `model`'s parameters across the ranks before `prepare`, one parameter at a time.

    DeepSpeed given a whole module first moves all of it to each rank's device, then partitions it: FLUX.1's bf16
    transformer (22 GiB) on every GPU at start-up, which keeps ZeRO-3 off 24 GB cards though its step needs 5 GiB.
    Partitioned here (`zero.Init(module=...)`: each parameter moved, broadcast from rank 0, cut to this rank's shard),
    DeepSpeed takes the module as one built under `zero.Init` and moves nothing whole. Parameters are first cast to
    the mixed-precision dtype, as DeepSpeed casts them (buffers keep theirs and go to the device, as DeepSpeed moves
    them); the fp32 masters are restored from the exact starting weights after `prepare` (`restore_fp32_masters`).
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return
    import copy

    import deepspeed

    if accelerator.mixed_precision in ("bf16", "fp16"):
        from sketch2real.models import dtype_for

        for param in model.parameters():
            param.data = param.data.to(dtype_for(accelerator.mixed_precision))
    for buffer in model.buffers():
        buffer.data = buffer.data.to(accelerator.device)
    config = copy.deepcopy(plugin.deepspeed_config)  # as accelerate hands it to zero.Init: no "auto" batch sizes
    config["train_micro_batch_size_per_gpu"] = config.get("train_micro_batch_size_per_gpu", 1)
    config.pop("train_batch_size", None)
    # F.linear stays torch's: zero.Init would otherwise replace it process-wide (frozen encoders, pipelines)
    config.setdefault("zero_optimization", {})["memory_efficient_linear"] = False
    from deepspeed.utils import groups

    # ZeRO++'s secondary partition group, once made (a later sequential stage), is reused as the engine reuses it
    deepspeed.zero.Init(module=model, config_dict_or_path=config,
                        zero_param_parallel_group=groups._get_zero_param_intra_parallel_group())


@contextmanager
def zero3_init_disabled(accelerator) -> Iterator[None]:
    """A context in which `from_pretrained` builds whole modules even under ZeRO-3.

    Under ZeRO-3, transformers' from_pretrained partitions parameters while loading
    (a collective, via the config accelerate registers): frozen modules used outside
    DeepSpeed, and loads done by rank 0 alone (saving), must not do that.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


_GATHERED_FOR_THE_BLOCK = -1  # a module id no module has: DeepSpeed releases a parameter no module still uses


@contextmanager
def zero3_embeddings_gathered(accelerator, modules: list) -> Iterator[None]:
    """Under ZeRO-3, the embedding tables of `modules` (trained text encoders) whole on every rank for the block.

    ZeRO-3 fetches a module's own parameters as the module runs; CLIP's text embeddings read the size of their
    position table before it runs, an empty partition until a training forward has traced the fetch order: a
    validation before the first step (a run resumed at a step whose validation a preemption cut) failed with
    "max_position_embeddings: 0". Gathered alone they were released again by the first encoder pass's hooks, so they
    are also held in use for the block. The tables are small (CLIP-L's 38M values); a collective: every rank calls
    it."""
    plugin = accelerator.state.deepspeed_plugin
    params = [p for m in modules if m is not None for name, p in m.named_parameters() if "embeddings." in name]
    if plugin is None or plugin.zero_stage != 3 or not params:
        yield
        return
    from deepspeed import zero

    with zero.GatheredParameters(params):
        for param in params:  # in use for the block: the forward hooks release a module's parameters after it runs
            param.ds_active_sub_modules.add(_GATHERED_FOR_THE_BLOCK)
        try:
            yield
        finally:
            for param in params:
                param.ds_active_sub_modules.discard(_GATHERED_FOR_THE_BLOCK)
