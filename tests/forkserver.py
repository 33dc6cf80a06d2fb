"""Test speed only: start the repo's scripts by `fork` from a process that has already imported torch, diffusers,
transformers, DeepSpeed and sketch2real, instead of in a fresh interpreter.

Importing them costs ~20 s of CPU per interpreter on this machine, more than a tiny training run itself, and the
suite starts a few hundred. `accelerate launch` still runs for real (its config file, flags, environment and
DeepSpeed set-up); only torchrun's agent is replaced: the ranks are forked with the variables torchrun gives its
workers, and when one fails the others get SIGTERM, then SIGKILL, as torchrun does. Tests about processes themselves
(signals, Slurm, the launcher's exit codes) start real subprocesses. `SKETCH2REAL_TEST_FORK=0` turns this off.

Run as `python -m tests.forkserver` (by `tests.helpers`): one JSON request per stdin line
({argv, env, cwd, stdout, stderr}), answered with {"pid"} at once and {"returncode"} at the end.

Slurm jobs reach it through a Unix socket (`--serve SOCKET`, `tests.helpers.forked_python`): their `$PYTHON` is a
shim running this file with `--client SOCKET ARGS...`, which hands the server its argv, environment, directory,
ignored signals and its stdin/stdout/stderr themselves (the job's log), forwards every signal it gets to the forked
process group (as Slurm signals every process of a step), and exits with its code; a killed client takes its job
with it, and what is left of a job's process group when its command ends is killed (as Slurm ends a step). A
forked `accelerate launch` dies at SIGTERM at once (torchrun's agent would wait for its ranks): tests of signals
keep real interpreters. Anything but a script or a launcher module (`LAUNCHERS`; `python - <<EOF`) runs in a real interpreter.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import time
import traceback
import typing
from pathlib import Path

LAUNCHERS = ("accelerate.commands.launch", "sketch2real.launcher")  # run with torchrun's agent replaced by forks
PRELOAD = [
    "torch", "torch.distributed.run", "deepspeed", "accelerate", "accelerate.commands.launch", "peft", "transformers",
    "diffusers", "safetensors.torch", "webdataset", "pytorch_fid.inception", "scipy.linalg",
    "sketch2real.cli", "sketch2real.launcher", "sketch2real.training.loop", "sketch2real.training.dreambooth", "sketch2real.training.controlnet",
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
            if argv[1] in LAUNCHERS:
                import accelerate.commands.launch
                import torch.distributed.run

                torch.distributed.run.run = _fork_ranks
                accelerate.commands.launch.simple_launcher = _fork_simple
                importlib.import_module(argv[1]).main()  # its `__main__` (runpy warns of a module already imported)
            else:
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


def _environment(env: dict) -> None:
    """This process's environment becomes `env`, as a new interpreter's would; huggingface_hub reads its variables
    (HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN) once, at import: read again."""
    import importlib

    os.environ.clear()
    os.environ.update(env)
    if "huggingface_hub.constants" in sys.modules:
        importlib.reload(sys.modules["huggingface_hub.constants"])


def _fork_simple(args) -> None:
    """accelerate's one-process launch (`simple_launcher`), by fork: the script runs with the environment accelerate
    prepared, and a failure raises as the launcher's own `subprocess` call does."""
    import subprocess

    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    command, env = prepare_simple_launcher_cmd_env(args)
    assert command[0] == sys.executable, command  # no mpirun, no --no_python
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _environment(env)
        _run(command[1:])
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code != 0:
        raise subprocess.CalledProcessError(returncode=code, cmd=command)


def _fork_ranks(args) -> None:
    """torchrun's static launch (`torch.distributed.run.run`), by fork: each rank of this node gets the agent's
    environment plus the variables torchrun sets per worker (global ranks from --node_rank, the rendezvous store on the
    first node's rank 0); the first failure stops the others (SIGTERM, SIGKILL after 30 s)."""
    from torch.distributed.run import get_rdzv_endpoint

    nproc = int(args.nproc_per_node)
    nnodes = int(str(args.nnodes).split(":")[-1])
    node = int(args.node_rank)
    assert nnodes == 1 or args.rdzv_backend == "static", "the fork launcher needs torchrun's static rendezvous"
    endpoint = f"{args.master_addr or '127.0.0.1'}:{args.master_port}" if nnodes == 1 else get_rdzv_endpoint(args)
    address, port = endpoint.rsplit(":", 1)  # accelerate gives several nodes a --rdzv_endpoint
    children: dict[int, int] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    for local in range(nproc):
        pid = os.fork()
        if pid == 0:
            rank = node * nproc + local
            os.environ.update({
                "RANK": str(rank), "LOCAL_RANK": str(local), "GROUP_RANK": str(node), "ROLE_RANK": str(rank),
                "ROLE_NAME": "default", "LOCAL_WORLD_SIZE": str(nproc), "WORLD_SIZE": str(nnodes * nproc),
                "GROUP_WORLD_SIZE": str(nnodes), "ROLE_WORLD_SIZE": str(nnodes * nproc),
                "MASTER_ADDR": address,
                "MASTER_PORT": port, "TORCHELASTIC_RESTART_COUNT": "0",
                "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "False",
            })
            sys.stdout.reconfigure(line_buffering=True)  # torchrun starts workers with `python -u`
            _run([args.training_script, *args.training_script_args])
        children[pid] = node * nproc + local
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
    if failures:  # as torchrun's agent reports them, the first failure first
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

        raise ChildFailedError(args.training_script, {rank: ProcessFailure(local_rank=rank % nproc, pid=0, exitcode=code,
                                                                           error_file="")
                                                      for rank, code in failures.items()})


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
            _environment(request["env"])
            _load_probes()
            _run(request["argv"])
        protocol.write(json.dumps({"pid": pid}) + "\n")
        protocol.flush()
        _, status = os.waitpid(pid, 0)
        protocol.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        protocol.flush()


def _serve_socket(path: str) -> typing.NoReturn:
    """Serve `--client` requests on the Unix socket `path`, each in a handler process of its own (jobs run at once)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(64)  # clients that come during the preload wait in the backlog
        _preload()
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the handlers are reaped by the kernel
        while True:
            connection, _ = server.accept()
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                server.close()
                _handle(connection)
            connection.close()


def _handle(connection: socket.socket) -> typing.NoReturn:
    """Fork the client's command with its descriptors, environment, signal dispositions and output buffering; relay
    the signals it forwards; answer its exit code. When the command ends, what is left of its process group is killed
    (as Slurm ends a step's processes); the client's connection closing (the client killed) kills the group too."""
    data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
    while len(data) < 8 or len(data) < 8 + int.from_bytes(data[:8], "big"):
        chunk = connection.recv(1 << 16)
        if not chunk:  # the client died before its request was whole
            os._exit(0)
        data += chunk
    request = json.loads(data[8:8 + int.from_bytes(data[:8], "big")])
    started_read, started_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        connection.close()
        os.close(started_read)
        for signum in FORWARDED:  # the client's dispositions, not the server's
            ignored = signum in request["ignored"]
            signal.signal(signum, signal.SIG_IGN if ignored else signal.default_int_handler
                          if signum == signal.SIGINT else signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        _environment(request["env"])
        _std_streams(unbuffered=bool(os.environ.get("PYTHONUNBUFFERED")))
        os.setsid()
        os.close(started_write)  # the group exists: signals may come
        _run(request["argv"])
    for fd in (*fds, started_write):
        os.close(fd)
    os.read(started_read, 1)  # EOF once the child has its own group (or has died)
    done = os.pidfd_open(pid)
    while done not in select.select([connection, done], [], [])[0]:
        forwarded = connection.recv(64)
        for signum in forwarded or [signal.SIGKILL]:  # nothing: the client is gone
            _kill_group(pid, signum)
        if not forwarded:
            break
    _kill_group(pid, signal.SIGKILL)  # the leader has exited (a zombie until waited for: its group id is not reused)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    try:
        connection.sendall(str(code).encode())
    except OSError:
        pass
    os._exit(0)


def _kill_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _std_streams(unbuffered: bool) -> None:
    """New sys.stdout and sys.stderr on descriptors 1 and 2, buffered as a new interpreter would with this environment
    (the server's were made for its own)."""
    import io

    for fd, name in ((1, "stdout"), (2, "stderr")):
        raw = io.FileIO(fd, "w", closefd=False)
        line = os.isatty(fd) or name == "stderr"
        stream = io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding="utf-8",
                                  errors="backslashreplace" if name == "stderr" else "strict",
                                  line_buffering=line and not unbuffered, write_through=unbuffered)
        setattr(sys, name, stream)


FORWARDED = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT]


def _client(path: str, argv: list[str]) -> typing.NoReturn:
    """`python ARGS...` as a Slurm job runs it, by the server at `path` (see the module's text)."""
    if not ((argv[:1] == ["-m"] and argv[1:2][0] in LAUNCHERS) or (argv and argv[0].endswith(".py"))):
        os.execv(sys.executable, [sys.executable, *argv])
    ignored = [int(s) for s in FORWARDED if signal.getsignal(s) == signal.SIG_IGN]
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # held until the request is sent, then forwarded
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(600):  # the server binds its socket a moment after it starts
        try:
            connection.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.1)

    def forward(received: int, _frame) -> None:
        try:
            connection.send(bytes([received]))
        except OSError:  # the job has ended and answered
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "ignored": ignored}).encode()
    socket.send_fds(connection, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    answer = b""
    while chunk := connection.recv(64):
        answer += chunk
    code = int(answer)
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        _serve_socket(sys.argv[2])
    elif sys.argv[1:2] == ["--client"]:
        _client(sys.argv[2], sys.argv[3:])
    else:
        _serve()
