#!/usr/bin/env bash
# One `accelerate launch` per node (srun starts it on each node), through sketch2real.launcher: accelerate's launch
# command without the `accelerate` CLI (which imports every subcommand first: `estimate` pulls in transformers,
# torchvision's models and timm, 3 s of CPU per node per job), ending with the trainer's own exit status (2 for a bad
# input, 75 preempted) instead of torchrun's traceback and status 1. SIGUSR1 is ignored by the launcher
# (an ignored signal survives exec and fork) so that only the Python trainers, which handle it, react to it.
# A preempted job's launcher exits 75 (its ranks stopped on a signal and left OUTPUT_DIR/PREEMPTED): reported to srun
# as success, so that `srun --kill-on-bad-exit=1` does not kill the other nodes' tasks while they finish writing their
# checkpoint; slurm/common.sh requeues the job from the PREEMPTED file. Any other failure passes through, also where
# the ranks stopped after it left PREEMPTED (sketch2real.launcher: a rank's crash first is the job's failure).
trap '' USR1
# SIGTERM (Slurm's at a preemption, to every process of the step) is the launcher's and the trainers' to handle: this
# shell waits for the launcher's status ("trap ':'" is not inherited, unlike an ignored signal), else it died at once
# and srun reported 143 while the trainers were still saving.
trap ':' TERM
# and torchrun's agent, stopped by it too, gives its ranks 30 s before SIGKILL: less than a checkpoint of a large model
# takes (the ranks were killed mid-save, the job failed with 143). Slurm's own grace time is the limit.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-3600}
status=0
"${PYTHON:-python3}" -m sketch2real.launcher --config_file "$ACCELERATE_CONFIG" --num_machines "${SLURM_NNODES:-1}" \
  --num_processes "${S2R_NUM_PROCESSES:-1}" --machine_rank "${SLURM_NODEID:-0}" \
  --main_process_ip "${MASTER_ADDR:-localhost}" --main_process_port "${MASTER_PORT:-29500}" "$@" || status=$?
if [ "$status" -eq 75 ]; then
  exit 0
fi
exit "$status"
