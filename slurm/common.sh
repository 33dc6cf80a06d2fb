#!/usr/bin/env bash
# Shared by the sbatch scripts: find the repo, build the multi-node `accelerate launch`, requeue on preemption.
# shellcheck shell=bash

# sbatch runs a spooled copy of the script: the repo is where sbatch was called (or SKETCH2REAL_HOME).
S2R_HOME=${SKETCH2REAL_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$S2R_HOME" || exit 1
# The base model of every job unless MODEL is set: SD 1.5's maintained copy (runwayml's was removed from the hub).
export S2R_DEFAULT_MODEL=stable-diffusion-v1-5/stable-diffusion-v1-5
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# A job's log is a file: progress bars (every tqdm: tqdm reads TQDM_* at import) redrawn every 30 s, not every 0.1 s
# (a 3,000-step run wrote one line of ~300 KB of fragments; its monitor forces one every maxinterval, 10 s); the
# hub's download bars off
if [ ! -t 2 ]; then
  export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30} TQDM_MAXINTERVAL=${TQDM_MAXINTERVAL:-30}
  export HF_HUB_DISABLE_PROGRESS_BARS=${HF_HUB_DISABLE_PROGRESS_BARS:-1}
fi
PYTHON=${PYTHON:-python3}
if [ "${SLURM_NNODES:-1}" -gt 1 ]; then
  ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node.yaml}
else
  ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_gpu.yaml}
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
# The rendezvous address: the first node's NodeAddr, what Slurm itself reaches it by (compute nodes need not resolve
# each other's names; torch retries an unresolvable name forever), else its name.
# sed, not head: head closes the pipe early, scontrol dies of SIGPIPE, and under pipefail the address was garbled.
if [ -z "${MASTER_ADDR:-}" ]; then
  S2R_FIRST_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | sed -n 1p || true)
  MASTER_ADDR=$(scontrol show node "${S2R_FIRST_NODE:-localhost}" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | sed -n 1p | cut -d= -f2 || true)
  MASTER_ADDR=${MASTER_ADDR:-${S2R_FIRST_NODE:-localhost}}
fi
# A port of the job's own: two jobs on one node must not share a rendezvous port. The batch script runs on the
# first node, where the rendezvous listens: from the job's port, the first one free there (another program, or a
# job of another cluster, may hold it).
s2r_free_port() {
  "$PYTHON" - "$1" <<'PY'
import socket, sys
first = int(sys.argv[1])
for port in range(first, first + 200):
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            continue
    print(port)
    break
else:
    print(first)
PY
}
if [ -z "${MASTER_PORT:-}" ]; then
  MASTER_PORT=$(s2r_free_port $((20000 + ${SLURM_JOB_ID:-0} % 20000)))
fi
export MASTER_ADDR MASTER_PORT

s2r_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# s2r_launch SCRIPT ARGS...: one `accelerate launch` per node through srun (machine rank = node id), see
# launch_node.sh. On SIGUSR1 the trainers save a checkpoint, leave OUTPUT_DIR/PREEMPTED and exit 75.
s2r_launch() {
  export S2R_NUM_PROCESSES=$(( ${SLURM_NNODES:-1} * GPUS_PER_NODE )) ACCELERATE_CONFIG
  # A name that does not resolve: one line now, not a rendezvous that retries without end (numeric addresses pass).
  if ! [[ $MASTER_ADDR =~ ^[0-9.]+$ || $MASTER_ADDR == *:* ]] && ! getent hosts "$MASTER_ADDR" >/dev/null; then
    s2r_log "error: the rendezvous address $MASTER_ADDR does not resolve on $(hostname -s); set MASTER_ADDR to an address the nodes reach"
    return 2
  fi
  s2r_log "launch: $1 on ${SLURM_NNODES:-1} node(s) x $GPUS_PER_NODE process(es), config $ACCELERATE_CONFIG"
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    # Since Slurm 22.05 srun does not inherit --cpus-per-task: give each node's launcher the job's CPUs
    # (data workers, tokenizers), or every rank shares one core.
    srun --kill-on-bad-exit=1 --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
      bash slurm/launch_node.sh "$@"
  else
    bash slurm/launch_node.sh "$@"
  fi
}

# s2r_finish OUTPUT_DIR STATUS: requeue the job if the trainer was preempted, else exit with STATUS. A failure
# (STATUS not 0) is never requeued, PREEMPTED or not: ranks stopped after another rank's crash leave one, and the
# same crash (a full disk, out of memory) would come back at every requeue.
s2r_finish() {
  local output_dir=$1 status=$2
  if [ -f "$output_dir/PREEMPTED" ] && [ "$status" -ne 0 ]; then
    rm -f "$output_dir/PREEMPTED"
    s2r_log "failed with status $status (the ranks stopped after it left PREEMPTED): not requeued; rerun once fixed: it resumes"
    exit "$status"
  fi
  if [ -f "$output_dir/PREEMPTED" ]; then
    rm -f "$output_dir/PREEMPTED"
    if [ -n "${SLURM_JOB_ID:-}" ]; then
      s2r_log "preempted: checkpoint saved; requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})"
      scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
  fi
  exit "$status"
}
