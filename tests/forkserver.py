"""Test speed only: start the repo's scripts by `fork` from a process that has already imported torch, diffusers,
transformers, DeepSpeed and sketch2real, instead of in a fresh interpreter.

Importing them costs ~20 s of CPU per interpreter on this machine, more than a tiny training run itself, and the
suite starts a few hundred. `accelerate launch` still runs for real (its config file, flags, environment and
DeepSpeed set-up); only torchrun's agent is replaced: the ranks are forked with the variables torchrun gives its
workers, and when one fails the others get SIGTERM, then SIGKILL, as torchrun does. Tests about processes themselves
(signals, Slurm, the launcher's exit codes) start real subprocesses. `SKETCH2REAL_TEST_FORK=0` turns this off.

Run as `python -m tests.forkserver` (by `tests.helpers`): one JSON request per stdin line
({argv, env, cwd, stdout, stderr}), answered with {"pid"} at once and {"returncode"} at the end.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
import traceback
import typing
from pathlib import Path

PRELOAD = [
    "torch", "torch.distributed.run", "deepspeed", "accelerate", "accelerate.commands.launch", "peft", "transformers",
    "diffusers", "safetensors.torch", "webdataset", "pytorch_fid.inception", "scipy.linalg",
    "sketch2real.cli", "sketch2real.training.loop", "sketch2real.training.dreambooth", "sketch2real.training.controlnet",
    "sketch2real.training.textual_inversion", "sketch2real.training.sequential", "sketch2real.evaluation",
    "sketch2real.extractors", "sketch2real.generation", "sketch2real.captioning", "sketch2real.family",
]
# Classes diffusers and transformers import lazily on first attribute access.
PRELOAD_ATTRIBUTES = {
    "diffusers": ["StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
                  "StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline", "UNet2DConditionModel",
                  "AutoencoderKL", "ControlNetModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
                  "DDPMScheduler", "PNDMScheduler", "FlowMatchEulerDiscreteScheduler"],
    "transformers": ["CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "T5EncoderModel", "T5TokenizerFast",
                     "CLIPModel", "CLIPProcessor", "Blip2ForConditionalGeneration", "LlavaForConditionalGeneration",
                     "AutoProcessor"],
}


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional package missing: its scripts import it themselves
            pass
    for module, attributes in PRELOAD_ATTRIBUTES.items():
        for attribute in attributes:
            try:
                getattr(importlib.import_module(module), attribute)
            except Exception:
                pass


def _run(argv: list[str]) -> typing.NoReturn:
    """Run `argv` as `python *argv` would in this (forked) process, then end it as a script ends its own
    (`sketch2real.cli.exit_now`: non-daemon threads, atexit handlers, flushed output)."""
    from sketch2real.cli import exit_now

    code: int | str | None = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            if argv[1] == "accelerate.commands.launch":
                import torch.distributed.run

                torch.distributed.run.run = _fork_ranks
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_now(code)


def _fork_ranks(args) -> None:
    """torchrun's single-node launch (`torch.distributed.run.run`), by fork: each rank gets the agent's environment
    plus the variables torchrun sets per worker; the first failure stops the others (SIGTERM, SIGKILL after 30 s)."""
    nproc = int(args.nproc_per_node)
    assert str(args.nnodes) in ("1", "1:1"), "the fork launcher is single-node"
    children: dict[int, int] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            os.environ.update({
                "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
                "ROLE_NAME": "default", "LOCAL_WORLD_SIZE": str(nproc), "WORLD_SIZE": str(nproc),
                "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": args.master_addr or "127.0.0.1",
                "MASTER_PORT": str(args.master_port), "TORCHELASTIC_RESTART_COUNT": "0",
                "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "False",
            })
            sys.stdout.reconfigure(line_buffering=True)  # torchrun starts workers with `python -u`
            _run([args.training_script, *args.training_script_args])
        children[pid] = rank
    failures: dict[int, int] = {}
    deadline = None
    while children:
        if deadline is not None and time.monotonic() > deadline:
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            deadline = None
        pid, status = os.waitpid(-1, os.WNOHANG) if deadline is not None else os.waitpid(-1, 0)
        if pid == 0:
            time.sleep(0.1)
            continue
        rank = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if rank is None or code == 0:
            continue
        if not failures:
            for other in children:
                os.kill(other, signal.SIGTERM)
            deadline = time.monotonic() + 30
        failures[rank] = code
    if failures:
        raise RuntimeError(f"ChildFailedError: {args.training_script} failed on ranks (rank: exit code) {failures}")


def _load_probes() -> None:
    """A probe folder of the tests (tests/probes/*) on PYTHONPATH: its sitecustomize runs, as a new interpreter's
    would (a forked child never runs `site` again)."""
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        probe = Path(entry) / "sitecustomize.py"
        if entry and Path(entry).parent.name == "probes" and probe.is_file():
            runpy.run_path(str(probe), run_name="sitecustomize")


def _serve() -> None:
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # imports' prints must not reach the protocol
    _preload()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            protocol.close()
            os.setsid()  # the caller kills the whole group (ranks included) on a timeout
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            _load_probes()
            _run(request["argv"])
        protocol.write(json.dumps({"pid": pid}) + "\n")
        protocol.flush()
        _, status = os.waitpid(pid, 0)
        protocol.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        protocol.flush()


if __name__ == "__main__":
    _serve()
