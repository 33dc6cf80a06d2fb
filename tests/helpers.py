"""What the tests share beyond fixtures: running scripts as users do (one process, `accelerate launch` with DDP
or DeepSpeed), reading trained weights, and the launcher matrix's checks."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class _ForkServer:
    """One `tests.forkserver` per test process (see there): scripts start by fork with everything imported."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def run(self, argv: list[str], env: dict, cwd: str, timeout: float) -> subprocess.CompletedProcess:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.forkserver"], cwd=REPO, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, bufsize=0,  # unbuffered: select() sees every line
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        with tempfile.TemporaryDirectory() as scratch:
            out, err = Path(scratch, "stdout"), Path(scratch, "stderr")
            request = {"argv": argv, "env": env, "cwd": cwd, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            pid = json.loads(self.proc.stdout.readline())["pid"]
            timed_out = not select.select([self.proc.stdout], [], [], timeout)[0]
            if timed_out:
                os.killpg(pid, signal.SIGKILL)
            returncode = json.loads(self.proc.stdout.readline())["returncode"]
            stdout, stderr = (file.read_text(errors="replace") for file in (out, err))
        if timed_out:
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, stdout, stderr)
        return subprocess.CompletedProcess([sys.executable, *argv], returncode, stdout, stderr)


_fork_server = _ForkServer()


def _python(argv: list[str], env: dict, timeout: float, cwd: str) -> subprocess.CompletedProcess:
    """`python *argv`, output captured: forked from the test process's fork server unless SKETCH2REAL_TEST_FORK=0
    (or another call from this process is running)."""
    if os.environ.get("SKETCH2REAL_TEST_FORK", "1") != "0" and _fork_server.lock.acquire(blocking=False):
        try:
            return _fork_server.run(argv, env, cwd, timeout)
        finally:
            _fork_server.lock.release()
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


def run_script(script: str, *args: str, env: dict | None = None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a repo script as a user would, capturing output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = _python([str(REPO / script), *map(str, args)], env=full_env, timeout=timeout, cwd=os.getcwd())
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def launch(script: str, *args: str, num_processes: int = 2, deepspeed_config: str | None = None, check: bool = True,
           timeout: int = 600, accelerate_precision: str | None = "no") -> subprocess.CompletedProcess:
    """`accelerate launch` a repo script with real CPU processes (DDP over gloo, or DeepSpeed).

    `accelerate_precision` is `accelerate launch --mixed_precision` (None: the config file's own setting).
    """
    argv, env = launch_command(script, *args, num_processes=num_processes, deepspeed_config=deepspeed_config,
                               accelerate_precision=accelerate_precision)
    proc = _python(argv, env=env, timeout=timeout, cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def launch_command(script: str, *args: str, num_processes: int = 2, deepspeed_config: str | None = None,
                   accelerate_precision: str | None = "no") -> tuple[list[str], dict]:
    """`launch`'s `python` arguments and environment (for a test that runs it in the background)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if deepspeed_config:  # ACCELERATE_USE_CPU would silently turn DeepSpeed off
        env.pop("ACCELERATE_USE_CPU", None)
        head = ["--config_file", str(REPO / deepspeed_config), "--num_processes", str(num_processes)]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        head = ["--config_file", str(REPO / "accelerate_configs/cpu.yaml"), "--num_processes", str(num_processes)]
    if accelerate_precision:
        head += ["--mixed_precision", accelerate_precision]
    import socket

    with socket.socket() as sock:  # a free port: parallel test workers must not share the rendezvous port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    head += ["--main_process_port", str(port)]
    return ["-m", "accelerate.commands.launch", *head, str(REPO / script), *map(str, args)], env


def weights(folder) -> dict:
    """All tensors of the safetensors files in `folder` (not its subfolders), keyed by file + name."""
    from safetensors.torch import load_file

    folder = Path(folder)
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            out[f"{file.relative_to(folder)}:{name}"] = tensor
    return out


def relative_difference(a: dict, b: dict, base: dict) -> float:
    """||a - b|| / ||a - base|| over all shared tensors: how far two runs differ relative to what training changed."""
    import torch

    diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in a])
    moved = torch.cat([(a[k].float() - base[k].float()).flatten() for k in a])
    return float(diff.norm() / moved.norm())


# The configurations users run: 1 process, DDP with 2 processes, DeepSpeed ZeRO-2 and ZeRO-3 with 2 processes
# (the project's own configs), and ZeRO-3 partitioning even the tiniest parameters (a DeepSpeed JSON config file).
LAUNCHERS = ["1", "ddp", "zero2", "zero3"]
DEEPSPEED_CONFIGS = {"zero2": "accelerate_configs/deepspeed_zero2.yaml", "zero3": "accelerate_configs/deepspeed_zero3.yaml",
                     "zero3_partitioned": "tests/configs/zero3_partitioned.yaml"}


def train_in(launcher: str, script: str, *args, out: Path, precision: str = "bf16", run_dir: str = "") -> dict:
    """Run a trainer as users run it and check what every run must show; returns its metrics.json.

    1 process and DDP get `--mixed_precision` on the command line; DeepSpeed runs take it from the
    config (bf16), as `--mixed_precision` left out must follow accelerate. `run_dir`: where the run's
    metrics are, inside `out` (sequential DreamBooth: a stage's folder).
    """
    import json
    import math

    if launcher == "1":
        proc = run_script(script, *args, "--output_dir", out, "--mixed_precision", precision)
    elif launcher == "ddp":
        proc = launch(script, *args, "--output_dir", out, "--mixed_precision", precision)
    else:
        assert precision == "bf16", "the DeepSpeed configs set bf16"
        proc = launch(script, *args, "--output_dir", out, deepspeed_config=DEEPSPEED_CONFIGS[launcher], accelerate_precision=None)
    metrics = json.loads((out / run_dir / "metrics.json").read_text())
    assert metrics["mixed_precision"] == precision, proc.stderr[-2000:]
    assert metrics["num_processes"] == (1 if launcher == "1" else 2)
    assert metrics["distributed_type"] == {"1": "NO", "ddp": "MULTI_CPU"}.get(launcher, "DEEPSPEED")
    assert math.isfinite(metrics["final_loss"])
    # "trained weights stay fp32": what the optimizer updates and its moments, on every launcher and precision
    assert metrics["optimizer_dtypes"] == {"parameters": ["torch.float32"], "state": ["torch.float32"]}, metrics["optimizer_dtypes"]
    assert json.loads((out / run_dir / "run_config.json").read_text())["mixed_precision"] == precision
    return metrics


_reference_runs: dict[str, Path] = {}


def reference_run(key: str, tmp_path_factory, script: str, *args, precision: str = "bf16") -> Path:
    """A 1-process run made once per test session (a matrix's reference): its output folder."""
    if key not in _reference_runs:
        out = tmp_path_factory.mktemp(key) / "out"
        train_in("1", script, *args, out=out, precision=precision)
        _reference_runs[key] = out
    return _reference_runs[key]


def run_matrix_case(launcher: str, name: str, script: str, args: list, tmp_path: Path, tmp_path_factory,
                    launcher_args: tuple = ()) -> tuple[Path, Path, Path]:
    """(this launcher's output folder, the 1-process bf16 run's, the 1-process fp32 run's), all with a global batch
    of 2; the 1-process runs are made once per session and shared by the launchers. `launcher_args`: flags of the
    launcher's run only."""
    one, one_fp32 = (reference_run(f"{name}-{precision}", tmp_path_factory, script, *args, "--train_batch_size", "2",
                                   precision=precision) for precision in ("bf16", "no"))
    if launcher == "1":
        return one, one, one_fp32
    out = tmp_path / "out"
    train_in(launcher, script, *args, *launcher_args, "--train_batch_size", "1", out=out)
    return out, one, one_fp32


# Matrix runs use Adam with a large epsilon: updates are then proportional to gradients, so bf16 rounding of tiny
# gradients moves weights by tiny amounts (with the default 1e-8, Adam turns them into +-lr steps of random sign
# and the comparison drowns in noise). Sharp enough to have caught ZeRO-2/3 starting from bf16-rounded weights.
SHARP_ADAM = ["--adam_epsilon", "1e-2"]


def assert_agrees_within_bf16(one: dict, two: dict, one_fp32: dict, base: dict) -> None:
    """A 2-process bf16 run is as close to the 1-process bf16 run as bf16 rounding itself moves a run.

    The scale is measured (1-process bf16 vs fp32), not guessed; a wrong batch, a missing gradient sync or
    rounded starting weights move weights by about as much as training moved them, far above it.
    """
    noise = relative_difference(one_fp32, one, base)
    difference = relative_difference(one, two, base)
    assert difference <= max(0.05, 2 * noise), f"2 processes vs 1: {difference:.4f}; bf16 vs fp32 (1 process): {noise:.4f}"


def in_process_accelerator(mixed_precision: str = "bf16"):
    """What a trainer's task reads of an accelerator, for building tasks in the test process: one CPU process."""
    from types import SimpleNamespace

    import torch

    return SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace(deepspeed_plugin=None), num_processes=1,
                           process_index=0, mixed_precision=mixed_precision, is_main_process=True,
                           unwrap_model=lambda model: model)


def pause_at_step(env: dict, step: int, marker: Path, run_name: str | None = None) -> dict:
    """`env` with tests/probes/pause: every trainer process writes `marker`.rank<R> (its pid) at `step` and waits
    there for a preemption signal (a test signals on that event, never after a sleep that races the run's end);
    `run_name`: only in the run whose folder is named so (a sequential stage)."""
    path = os.pathsep.join(p for p in (str(REPO / "tests/probes/pause"), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path, "S2R_PROBE_PAUSE_AT_STEP": str(step), "S2R_PROBE_PAUSE_FILE": str(marker),
            **({"S2R_PROBE_PAUSE_RUN": run_name} if run_name else {})}


def fresh_clone(dest: Path) -> Path:
    """The repository's tracked files at `dest`, as `git clone` gives them (no logs, data or runs of this checkout);
    commands run there as a user runs them from a new clone."""
    import shutil

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (t.decode() for t in tracked)):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def readme_blocks() -> list[str]:
    """Every ```bash block of README.md, in order."""
    import re

    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def readme_block(containing: str) -> str:
    """The one README bash block holding `containing`."""
    found = [b for b in readme_blocks() if containing in b]
    assert len(found) == 1, f"{len(found)} README blocks hold {containing!r}"
    return found[0]


# The hub ids the jobs load by default (the README's: MODEL, CAPTION_MODEL, DINOV2_MODEL and CLIP_MODEL unset) -> the
# tiny model standing in for each in `hub_cache_of_defaults`.
DEFAULT_MODEL_IDS = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd", "llava-hf/llava-1.5-7b-hf": "llava",
                     "facebook/dinov2-large": "dinov2", "openai/clip-vit-large-patch14-336": "clip",
                     "tomg-group-umd/CSD-ViT-L": "csd"}


def hub_cache_of_defaults(tiny_models) -> Path:
    """A Hugging Face hub cache (for HF_HUB_CACHE) holding the tiny models under the default hub ids, as a user's cache
    holds what the hub gave: offline, the README's commands load their default models by id, as written."""
    revision = "0" * 40
    cache = Path(tiny_models.sd).parent / "hub"
    for repo_id, name in DEFAULT_MODEL_IDS.items():
        folder = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = folder / "snapshots" / revision
        if not snapshot.exists():
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            snapshot.symlink_to(Path(getattr(tiny_models, name)).resolve(), target_is_directory=True)
            (folder / "refs").mkdir(exist_ok=True)
            (folder / "refs" / "main").write_text(revision)
    return cache


def readme_cpu_env(tiny_models, **extra: str) -> dict:
    """What the README says to set to run its commands on CPU-only Slurm nodes (README: "Without GPUs"); MODEL and
    CAPTION_MODEL unset, as a user leaves them: the jobs load their default hub ids, the tiny models in the hub cache."""
    env = {**os.environ, "SBATCH_GPUS_PER_NODE": "0", "GPUS_PER_NODE": "2",
           "ACCELERATE_CONFIG": "accelerate_configs/cpu.yaml", "OMP_NUM_THREADS": "1", "PRECISION": "no",
           "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache_of_defaults(tiny_models)),
           "TORCH_HOME": str(tiny_models.torch_home), **extra}
    # no GPU is enough: the README sets none of these; the models are the defaults
    for name in ("MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU", "MODEL", "CAPTION_MODEL", "DINOV2_MODEL", "CLIP_MODEL"):
        if name not in extra:
            env.pop(name, None)
    return env


@contextlib.contextmanager
def forked_python(env: dict, repo: Path) -> Iterator[dict]:
    """`env` with PYTHON (what slurm/*.sh run) set to a `python3` whose scripts and `accelerate launch` are forked
    from an interpreter that has imported torch, diffusers... from `repo` (tests.forkserver's socket mode): a Slurm
    chain's jobs skip ~15 s of imports each. Everything else about the jobs is real: sbatch, dependencies, srun, the
    scripts, accelerate's launch, their logs and exit codes. For chains, not for tests of signals or dying processes.
    SKETCH2REAL_TEST_FORK=0 keeps real interpreters."""
    if os.environ.get("SKETCH2REAL_TEST_FORK", "1") == "0":
        yield env
        return
    scratch = Path(tempfile.mkdtemp(prefix="s2r-fork-"))  # short: a Unix socket's path has at most 107 bytes
    socket_path, shim = scratch / "socket", scratch / "python3"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{repo}/tests/forkserver.py" --client "{socket_path}" "$@"\n')
    shim.chmod(0o755)
    env = {**env, "PYTHONPATH": str(repo)}  # the clone's library, as run_readme_command gives the jobs
    with open(scratch / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "tests.forkserver", "--serve", str(socket_path)], cwd=repo,
                                  env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        yield {**env, "PYTHON": str(shim)}
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


def run_readme_command(command: str, cwd: Path, env: dict, timeout: int = 300, **substitutions: str) -> str:
    """`command` (a README line) run by bash in `cwd` with each placeholder the README names replaced; its stdout."""
    for placeholder, value in substitutions.items():
        assert placeholder in command, (placeholder, command)
        command = command.replace(placeholder, value)
    env = {**env, "PYTHONPATH": str(cwd)}  # the clone's library, as its own `pip install -e .` would give (sbatch passes it on)
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def wait_for_jobs(jobs: list[str], env: dict, logs: Path, seconds: float = 1200) -> None:
    """Until every Slurm job of `jobs` has left the queue; a dependency that can never be met fails with the logs."""
    import re
    import time

    def queued() -> list[str]:
        return subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(jobs)], env=env, capture_output=True,
                              text=True).stdout.splitlines()

    def tail() -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("*.out")))[-6000:]

    def leaked_allocation() -> bool:
        """Slurm 22.05 on this test cluster once logged `step_partial_comp: ... invalid` for a finished job's step and
        kept its CPUs allocated on an idle node: the pending jobs waited on Resources forever."""
        nodes = subprocess.run(["scontrol", "-o", "show", "node"], env=env, capture_output=True, text=True).stdout
        return any(re.search(r"\bCPUAlloc=[1-9]", line) and re.search(r"\bState=IDLE ", line)
                   for line in nodes.splitlines())

    deadline, stuck = time.time() + seconds, 0
    try:
        while (waiting := queued()) and time.time() < deadline:
            assert not any("DependencyNeverSatisfied" in line for line in waiting), tail()
            stuck = stuck + 1 if all(" PENDING " in line for line in waiting) and leaked_allocation() else 0
            if stuck == 3:  # reconfigure rebuilds each node's allocation from the jobs that run (none)
                subprocess.run(["scontrol", "reconfigure"], env=env, capture_output=True)
                stuck = 0
            time.sleep(1)
        assert not waiting, (waiting, tail())
    finally:  # a failed chain leaves its dependants pending forever
        subprocess.run(["scancel", *jobs], env=env, capture_output=True)


# The per-job settings the README's pipeline runs with on the tiny models (CONFIGS=dir: dir/JOB.yaml): what each job
# does is the scripts' default (full DreamBooth at its default learning rate...); only its size and side outputs change
TINY_PIPELINE_CONFIGS = {
    "dreambooth": {"validation_steps": 0, "report_to": "none", "num_heldout_samples": 0, "train_batch_size": 1},
    "dreambooth_sequential": {"learning_rate": 1e-3, "validation_steps": 0, "report_to": "none",
                              "num_heldout_samples": 2, "train_batch_size": 1},
    "textual_inversion": {"validation_steps": 0, "report_to": "none", "num_heldout_samples": 0},
    "controlnet": {"validation_steps": 0, "report_to": "none", "num_heldout_samples": 0, "train_batch_size": 1},
    "caption": {"max_new_tokens": 4, "batch_size": 4, "num_workers": 0},
    "generate": {"height": 32, "width": 32, "num_inference_steps": 2, "max_per_category": 2, "batch_size": 3},
    "fid": {"dims": 64, "no_cache": True, "batch_size": 8, "num_workers": 0, "bootstrap_resamples": 10},
}


def write_configs(folder: Path, configs: dict) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for job, values in configs.items():
        (folder / f"{job}.yaml").write_text(yaml.safe_dump(values))
    return folder


def readme_pipeline_env(tiny_models, configs: Path, **extra: str) -> dict:
    """The README's CPU form with the tiny models; the pipeline's documented settings sized for them."""
    settings = {"CATEGORIES": "cat,apple", "STEPS": "6", "CHECKPOINT_STEPS": "3", "RESOLUTION": "32",
                "CONFIGS": str(write_configs(configs, TINY_PIPELINE_CONFIGS)), **extra}
    env = readme_cpu_env(tiny_models, **settings)
    env.pop("STAGES", None)  # the default: every method
    return env


def check_pipeline_reports(repo: Path, jobs: list[str]) -> None:
    """What the README's pipeline promises: the style sets scored against the test sketches (the study's reference),
    the ControlNet's photos against the test photos, the sequential report, one log per job in logs/."""
    runs = repo / "runs"
    style = json.loads((runs / "fid" / "metrics.json").read_text())
    assert set(style["sets"]) == {"dreambooth", "textual_inversion", "captions"}
    assert style["reference"]["name"] == "test sketches" and style["sets"]["dreambooth"]["n_generated"] == 10
    assert style["sets"]["textual_inversion"]["n_generated"] == 10 and style["sets"]["captions"]["n_generated"] > 0
    photos = json.loads((runs / "fid_controlnet" / "metrics.json").read_text())
    assert set(photos["sets"]) == {"controlnet"} and photos["reference"]["name"] == "test photos"
    assert "dreambooth" in (runs / "fid" / "report.md").read_text() and (runs / "fid_controlnet" / "report.md").is_file()
    assert [p.name[len("stage-00-"):] for p in sorted((runs / "dreambooth_sequential").glob("stage-*"))] == ["cat", "apple"]
    assert (runs / "dreambooth_sequential" / "sequential_report.md").is_file()
    logs = sorted((repo / "logs").glob("*.out"))
    assert sorted(p.stem.rsplit("-", 1)[1] for p in logs) == sorted(jobs)  # the scripts' own --output, in the clone


def check_model_card_usage(out: Path, shard_dir: Path, tmp_path: Path) -> tuple[str, dict]:
    """The model card's "Use" section as a reader takes it: its `infer/generate.py` command (SHARDS: `shard_dir`)
    passes generate's own checks and asks for images; its python block runs (a sketch image at hand where it loads
    one). (the prompt it generates from, the block's names)."""
    import shlex

    from PIL import Image

    from sketch2real.cli import parse_options
    from sketch2real.generation import GenerateOptions, build_items

    use = (out / "README.md").read_text().split("## Use", 1)[1]
    command = shlex.split(use.split("```bash\n", 1)[1].split("\n```", 1)[0].replace("SHARDS", str(shard_dir)))
    assert command[:2] == ["python", "infer/generate.py"], command
    opts = parse_options(GenerateOptions, command[2:])
    opts.check()
    assert build_items(opts)
    code = use.split("```python\n", 1)[1].split("\n```", 1)[0]
    folder = tmp_path / "card-reader"
    folder.mkdir()
    sketch = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # black strokes on a transparent page, as drawing apps export
    for x in range(8, 56):
        sketch.putpixel((x, 32), (0, 0, 0, 255))
    sketch.save(folder / "a sketch.png")
    names: dict = {}
    previous = os.getcwd()
    os.chdir(folder)
    try:
        exec(code, names)  # noqa: S102  (the card's own lines, as a reader pastes them)
    finally:
        os.chdir(previous)
    if "sketch" in names:  # a ControlNet's condition as it trained: white strokes on black (not a blank white page)
        condition = names["sketch"].convert("L")
        assert condition.getpixel((0, 0)) == 0 and condition.getpixel((30, 32)) == 255
    return (opts.prompts or [opts.prompt_template])[0], names


def import_script(rel: str):
    """A script under infer/, eval/ or data_prep/ imported from its path (its `main` is not run)."""
    import importlib.util
    import re
    import sys

    name = "s2r_script_" + re.sub(r"\W", "_", rel[:-3])
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / rel)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


class FakeHub:
    """A local stand-in for the Hugging Face Hub's API, as huggingface_hub's `create_repo` and `create_commit` call it:
    repositories under the user `tester` (a request without a token is refused, as the hub refuses it), and commits
    of regular files, written under `root/<namespace>/<name>/` (`commits` lists each one's repository and message;
    `refuse_commits`: they fail).
    Point a process at it with `env()`."""

    user = "tester"

    def __init__(self, root: Path) -> None:
        import http.server

        self.root, self.commits, self.repos = Path(root), [], set()
        self.refuse_commits = False  # True: commits fail (a network down at the end of a run)
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # httpx keeps the connection

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, answer = hub.answer(self.path, body, self.headers.get("Authorization"))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self, token: str | None = "hf_test") -> dict:
        """The variables that send huggingface_hub's requests here (`token` None: not logged in)."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": token or "", "HF_HOME": str(self.root / "home")}

    def answer(self, path: str, body: bytes, authorization: str | None) -> tuple[int, dict]:
        import base64

        if not authorization:
            return 401, {"error": "Invalid username or password."}
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request.get('organization') or self.user}/{request['name']}"
            exists = repo in self.repos
            self.repos.add(repo)
            return (409 if exists else 200), {"url": f"{self.url}/{repo}"}
        if path == "/api/validate-yaml":
            return 200, {}
        parts = path.split("/")  # /api/models/<namespace>/<name>/<preupload|commit>/<revision>
        repo = "/".join(parts[3:5])
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        if parts[5] == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if self.refuse_commits:
            return 503, {"error": "Service Unavailable"}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        for line in lines[1:]:
            assert line["key"] == "file", line
            target = self.root / repo / line["value"]["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(line["value"]["content"]))
        self.commits.append({"repo": repo, "message": lines[0]["value"]["summary"]})
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{len(self.commits):040x}",
                     "commitOid": f"{len(self.commits):040x}", "pullRequestUrl": None}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def corrupt_one_sketch(shard_dir: Path, split: str) -> tuple[str, str]:
    """Rewrite one sketch member of `split`'s first shard (a copy: never the session's shards) as garbage of another
    length, as a bad disk or a broken download leaves it; (the shard's name, the sample's key)."""
    import io
    import tarfile

    from sketch2real.shards import load_index

    name = load_index(shard_dir, split)["shards"][0]["name"]
    with tarfile.open(shard_dir / name) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".sketch.png"))
    with tarfile.open(shard_dir / name, "w") as tar:
        for member, data in members:
            if member.name == victim:
                data = b"\x00not a png" * 10
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return name, victim.rsplit(".", 2)[0]
