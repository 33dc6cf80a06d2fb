#!/usr/bin/env bash
# One `accelerate launch` per node (srun starts it on each node). SIGUSR1 is ignored by the launcher
# (an ignored signal survives exec) so that only the Python trainers, which handle it, react to it.
trap '' USR1
exec accelerate launch --config_file "$ACCELERATE_CONFIG" --num_machines "${SLURM_NNODES:-1}" \
  --num_processes "${S2R_NUM_PROCESSES:-1}" --machine_rank "${SLURM_NODEID:-0}" \
  --main_process_ip "${MASTER_ADDR:-localhost}" --main_process_port "${MASTER_PORT:-29500}" "$@"
