"""slurm/*.sh against a real one-node Slurm on localhost (started here; .ci/run installs slurm-wlm and munge)."""

import os
import shutil
import subprocess
import time

import pytest

from .helpers import REPO

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


def _cpu_env(tmp_path, **extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PRECISION": "no", "RESOLUTION": "64",
            "ACCELERATE_CONFIG": "accelerate_configs/single_gpu.yaml", "GPUS_PER_NODE": "1", **extra}


CPU_FLAGS = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def test_data_prep_job(slurm, sketchy_root, tmp_path):
    env = _cpu_env(tmp_path, SKETCHY=str(sketchy_root), DATA=str(tmp_path / "data"))
    proc = subprocess.run(["sbatch", "--wait", *CPU_FLAGS, f"--output={tmp_path}/prep-%j.out", "slurm/data_prep.sh",
                           "--max_samples_per_shard", "20"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = "".join(p.read_text() for p in tmp_path.glob("prep-*.out"))
    assert proc.returncode == 0, log[-3000:]
    assert (tmp_path / "data/splits/train.jsonl").is_file() and (tmp_path / "data/shards/train.json").is_file()
    assert "train:" in log


def test_preempted_training_job_requeues_and_resumes(slurm, tiny_models, shard_dir, tmp_path):
    out = tmp_path / "db"
    env = _cpu_env(tmp_path, MODEL=str(tiny_models.sd), SHARDS=str(shard_dir), OUTPUT=str(out), STEPS="300",
                   CHECKPOINT_STEPS="0", CATEGORY="cat")
    sbatch = subprocess.Popen(["sbatch", "--wait", "--parsable", *CPU_FLAGS, f"--output={tmp_path}/db-%j.out",
                               "slurm/dreambooth.sh", "--validation_steps", "0", "--report_to", "none"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = sbatch.stdout.readline().strip().split(";")[0]
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "run_config.json").is_file():
        time.sleep(0.5)
    time.sleep(2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    sbatch.wait(timeout=600)
    log = "".join(p.read_text() for p in tmp_path.glob("db-*.out"))
    assert sbatch.returncode == 0, log[-4000:]
    assert "preempted: checkpoint saved" in log and "requeueing job" in log and "resumed from" in log
    checkpoint = next(out.glob("checkpoint-*"))
    assert 0 < int(checkpoint.name.split("-")[1]) < 300
    assert (out / "model_index.json").is_file() and not (out / "PREEMPTED").exists()
    assert '"steps": 300' in (out / "metrics.json").read_text()
