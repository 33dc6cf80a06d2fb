"""slurm/*.sh on a real two-node Slurm (two slurmd on this host, n1 = 127.0.0.1 and n2 = 127.0.0.2, one process per
node over gloo; ../shared/notes/slurm-two-nodes.md): training across nodes equals one node, preemption across nodes
requeues and resumes exactly, a node that dies ends the job in seconds and the job resumes (on one node too); the
README's pipeline as written (each job on one node) ends in its reports, and the same pipeline with every job on two
nodes ends with the same weights, captions, image bytes and scores (data-parallel captioning and generation across
nodes give the bytes of one node)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .helpers import (
    REPO,
    check_pipeline_reports,
    forked_python,
    fresh_clone,
    pause_at_step,
    readme_block,
    readme_pipeline_env,
    relative_difference,
    run_readme_command,
    wait_for_jobs,
    weights,
)

pytestmark = pytest.mark.skipif(shutil.which("slurmctld") is None or os.geteuid() != 0,
                                reason="needs root and Debian's slurmctld/slurmd/munge (make slurm-deps)")

CPU_FLAGS = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
STEPS = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The environment that reaches the two-node cluster (SLURM_CONF in a scratch folder), started and stopped here."""
    scratch = tmp_path_factory.mktemp("slurm2")
    subprocess.run(["bash", str(REPO / "slurm/local_cluster.sh"), "start2", str(scratch)], check=True, timeout=60)
    env = {**os.environ, "SLURM_CONF": str(scratch / "slurm.conf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_CONFIG": "accelerate_configs/cpu.yaml", "GPUS_PER_NODE": "1", "PRECISION": "no", "RESOLUTION": "32"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):  # the README's CPU form: no GPU, no variable
        env.pop(name, None)
    yield env
    subprocess.run(["bash", str(REPO / "slurm/local_cluster.sh"), "stop", str(scratch)], timeout=30)


def _log(tmp_path: Path, stem: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob(f"{stem}-*.out")))  # two nodes interleave


def _db_env(cluster, tiny_models, shard_dir, out: Path, **extra) -> dict:
    return {**cluster, "MODEL": str(tiny_models.sd), "SHARDS": str(shard_dir), "OUTPUT": str(out), "STEPS": str(STEPS),
            "CHECKPOINT_STEPS": "30", "CATEGORY": "cat", **extra}


DB_FLAGS = ["--lora_rank", "4", "--learning_rate", "1e-3", "--validation_steps", "0", "--report_to", "none",
            "--num_heldout_samples", "0", "--train_batch_size", "1"]


def _sbatch(env: dict, tmp_path: Path, stem: str, script: str, *args: str, flags=CPU_FLAGS, timeout: int = 600):
    return subprocess.run(["sbatch", "--wait", *flags, f"--output={tmp_path}/{stem}-%j.out", script, *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_node_run(cluster, tiny_models, shard_dir, tmp_path_factory) -> Path:
    """DreamBooth LoRA trained by `sbatch --nodes 2 slurm/dreambooth.sh` (the uninterrupted reference)."""
    tmp = tmp_path_factory.mktemp("two-node-db")
    out = tmp / "db"
    with forked_python(_db_env(cluster, tiny_models, shard_dir, out), REPO) as env:  # the preemption test's are real
        proc = _sbatch(env, tmp, "db", "slurm/dreambooth.sh", *DB_FLAGS)
    assert proc.returncode == 0, _log(tmp, "db")[-4000:]
    return out


def test_training_across_two_nodes_records_nodes_and_saves(two_node_run):
    """(Equality with one node, to the bit, is the pipeline test's.)"""
    metrics = json.loads((two_node_run / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["num_nodes"] == 2 and metrics["steps"] == STEPS
    assert json.loads((two_node_run / "run_config.json").read_text())["max_train_steps"] == STEPS
    assert (two_node_run / "pytorch_lora_weights.safetensors").is_file() and list(two_node_run.glob("checkpoint-*"))


def test_deepspeed_zero2_across_two_nodes(cluster, tiny_models, shard_dir, two_node_run, tmp_path):
    out = tmp_path / "zero2"
    env = _db_env(cluster, tiny_models, shard_dir, out, ACCELERATE_CONFIG="accelerate_configs/deepspeed_zero2.yaml",
                  PRECISION="bf16")
    with forked_python(env, REPO) as env:
        proc = _sbatch(env, tmp_path, "zero2", "slurm/dreambooth.sh", *DB_FLAGS)
    assert proc.returncode == 0, _log(tmp_path, "zero2")[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed_type"] == "DEEPSPEED" and metrics["num_nodes"] == 2 and metrics["steps"] == STEPS
    a, b = weights(two_node_run), weights(out)
    assert relative_difference(a, b, {k: v * 0 for k, v in a.items()}) < 0.05  # bf16 against fp32


def _trainer_pids(node_id: int) -> list[int]:
    """PIDs of the DreamBooth trainers Slurm started on node n{node_id + 1} (both nodes are this host)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"train/dreambooth.py") for arg in cmdline) and f"SLURM_NODEID={node_id}".encode() in environ \
                and b"RANK=" + str(node_id).encode() in environ:
            pids.append(int(proc.name))
    return pids


def _start(env, tmp_path, stem, *args) -> tuple[subprocess.Popen, str]:
    sbatch = subprocess.Popen(["sbatch", "--wait", "--parsable", *CPU_FLAGS, f"--output={tmp_path}/{stem}-%j.out",
                               "slurm/dreambooth.sh", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    return sbatch, sbatch.stdout.readline().strip().split(";")[0]


def _wait_for(condition, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.2)
    assert condition()


def test_preemption_across_nodes_requeues_and_resumes_exactly(cluster, tiny_models, shard_dir, two_node_run, tmp_path):
    out = tmp_path / "db"
    marker = tmp_path / "paused"
    env = pause_at_step(_db_env(cluster, tiny_models, shard_dir, out, CHECKPOINT_STEPS="0"), 40, marker)
    sbatch, job = _start(env, tmp_path, "pre", *DB_FLAGS)
    _wait_for(lambda: all(Path(f"{marker}.rank{r}").is_file() for r in (0, 1)))  # both nodes' trainers hold at step 40
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=cluster)
    sbatch.wait(timeout=600)
    log = _log(tmp_path, "pre")
    assert sbatch.returncode == 0, log[-4000:]
    assert "preempted: checkpoint saved" in log and "requeueing job" in log and "resumed from" in log
    step = int(next(out.glob("checkpoint-*")).name.split("-")[1])
    assert step == 50 and json.loads((out / "metrics.json").read_text())["steps"] == STEPS
    a, b = weights(two_node_run), weights(out)
    assert all((a[k] == b[k]).all() for k in a)  # the same two-node run, interrupted: bit-identical


def test_a_dead_node_ends_the_job_in_seconds_and_it_resumes_on_one_node(cluster, tiny_models, shard_dir, two_node_run,
                                                                       tmp_path):
    out = tmp_path / "db"
    env = _db_env(cluster, tiny_models, shard_dir, out)
    sbatch, job = _start(env, tmp_path, "dead", *DB_FLAGS)
    _wait_for(lambda: (out / "checkpoint-30").is_dir())
    victims = _trainer_pids(1)
    assert victims, "no trainer of node n2 found"
    os.kill(victims[0], signal.SIGKILL)
    killed = time.time()
    sbatch.wait(timeout=120)
    assert time.time() - killed < 30 and sbatch.returncode != 0  # no hang: the job failed at once
    assert not (out / "metrics.json").exists()
    # Requeued on one node, one process with the same global batch: resumes from the last checkpoint of two.
    one = _sbatch(env, tmp_path, "again", "slurm/dreambooth.sh", *DB_FLAGS, "--train_batch_size", "2",
                  flags=["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10"])
    log = _log(tmp_path, "again")
    assert one.returncode == 0, log[-4000:]
    assert "resumed from" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_nodes"] == 1 and metrics["num_processes"] == 1
    assert metrics["steps"] == STEPS and metrics["steps_this_run"] < STEPS
    a, b = weights(two_node_run), weights(out)
    assert relative_difference(a, b, {k: v * 0 for k, v in a.items()}) < 1e-2


def _pipeline(cluster, tiny_models, sketchy_root, root: Path, flags: list[str], jobs_expected: int = 12,
              **extra: str) -> list[str]:
    """The README's `SKETCHY=/data/sketchy bash slurm/pipeline.sh --partition gpu --account myproj` from a fresh clone at
    `root` in the README's CPU form on this cluster, default STAGES (every method: 12 jobs) unless `extra` sets them,
    with `flags` added to every job's sbatch; its job ids, once every job has left the queue."""
    repo = fresh_clone(root)
    env = {**readme_pipeline_env(tiny_models, root / "configs"), "SLURM_CONF": cluster["SLURM_CONF"], **extra}
    command = readme_block("bash slurm/pipeline.sh").strip() + "".join(f" {flag}" for flag in flags)
    with forked_python(env, repo) as env:
        submitted = run_readme_command(command, repo, env, **{"/data/sketchy": str(sketchy_root)})
        jobs = [word for line in submitted.splitlines() for word in line.split() if word.isdigit()]
        assert len(jobs) == jobs_expected, submitted
        wait_for_jobs(jobs, env, repo / "logs")
    return jobs


@pytest.fixture(scope="module")
def readme_pipeline(cluster, tiny_models, sketchy_root, tmp_path_factory) -> tuple[Path, list[str]]:
    """The README's pipeline command exactly as written (the data path its one substitution): every job on one node, as
    the scripts' own #SBATCH lines ask, with the CPU form's two processes (GPUS_PER_NODE=2); its clone and job ids.
    Run on this cluster's first node so that it is also the one-node reference of the two-node run below."""
    root = tmp_path_factory.mktemp("readme-pipeline")
    # n2 drained: the jobs queue on n1 one at a time, as on a one-node cluster. One-node jobs running at once on n1 and
    # n2 are two slurmd on one host with one hostname: there, Slurm mixed up their steps (a step's completion reported
    # for a job not yet started, a rank killed as it exited, n2's CPUs left allocated so that nothing ran again).
    node = ["scontrol", "update", "nodename=n2"]
    subprocess.run([*node, "state=drain", "reason=one-node run"], env=cluster, check=True, timeout=30)
    try:
        return root, _pipeline(cluster, tiny_models, sketchy_root, root, [])
    finally:
        subprocess.run([*node, "state=resume"], env=cluster, check=True, timeout=30)


def test_the_readme_pipeline_as_written_ends_in_its_reports(readme_pipeline):
    check_pipeline_reports(*readme_pipeline)


def test_the_pipeline_on_two_nodes_ends_with_the_metrics_of_one_node(cluster, tiny_models, sketchy_root, readme_pipeline,
                                                                     tmp_path):
    """The README's chain with STAGES="dreambooth captions" (data prep, DreamBooth and captioning, their generations,
    FID: 6 jobs), every job on two nodes (one process each), against the README's whole chain on one node (two
    processes): the same splits and shards, trained weights, captions, image bytes and scores. (The other trainers
    across two nodes: the tests above; every stage's reports: the one-node run.)"""
    jobs = _pipeline(cluster, tiny_models, sketchy_root, tmp_path / "two", CPU_FLAGS, jobs_expected=6, GPUS_PER_NODE="1",
                     STAGES="dreambooth captions")
    logs = sorted((tmp_path / "two" / "logs").glob("*.out"))
    assert sorted(p.stem.rsplit("-", 1)[1] for p in logs) == sorted(jobs)  # one log per job, the scripts' own --output
    runs = {"one": readme_pipeline[0] / "runs", "two": tmp_path / "two" / "runs"}
    trained = {name: json.loads((r / "dreambooth_cat" / "metrics.json").read_text()) for name, r in runs.items()}
    assert (trained["two"]["num_nodes"], trained["one"]["num_nodes"]) == (2, 1)
    assert trained["two"]["num_processes"] == trained["one"]["num_processes"] == 2
    for name in ("train.json", "test.json"):
        assert (runs["two"].parent / "data" / "shards" / name).read_bytes() == (runs["one"].parent / "data" / "shards" / name).read_bytes()
    a, b = weights(runs["two"] / "dreambooth_cat" / "unet"), weights(runs["one"] / "dreambooth_cat" / "unet")  # full UNet
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # two ranks either way: the same sums
    images = {name: {p.relative_to(r): p.read_bytes() for p in (r / "gen_dreambooth" / "images").rglob("*.png")}
              for name, r in runs.items()}
    assert len(images["two"]) == 10 and images["two"] == images["one"]
    captions = {name: (r / "captions" / "captions.jsonl").read_bytes() for name, r in runs.items()}
    assert captions["two"] and captions["two"] == captions["one"]
    assert json.loads((runs["two"] / "captions" / "metrics.json").read_text())["num_processes"] == 2
    scores = {name: json.loads((r / "fid" / "metrics.json").read_text()) for name, r in runs.items()}
    assert scores["two"]["num_processes"] == scores["one"]["num_processes"] == 2
    assert scores["two"]["reference"]["name"] == scores["one"]["reference"]["name"] == "test sketches"
    assert set(scores["two"]["sets"]) == {"dreambooth", "captions"}
    for key in ("fid", "kid", "n_generated"):
        assert scores["two"]["sets"]["dreambooth"][key] == scores["one"]["sets"]["dreambooth"][key]
