#!/usr/bin/env bash
# Sequential-class DreamBooth (stages resume too): CATEGORIES=cat,dog,helicopter,hamburger sbatch slurm/dreambooth_sequential.sh
# CATEGORIES, not STAGES: STAGES is slurm/pipeline.sh's list of methods, and sbatch passes the environment on.
# Settings by environment (MODEL, SHARDS, OUTPUT, STEPS, PRECISION, ...); extra flags after the script name.
#SBATCH --job-name=s2r-dreambooth_sequential
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${SKETCH2REAL_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
MODEL=${MODEL:-$S2R_DEFAULT_MODEL}
SHARDS=${SHARDS:-data/shards}
OUTPUT=${OUTPUT:-runs/dreambooth_sequential}
STEPS=${STEPS:-400}
DEFAULT_PROMPT='a {category} in the style of sks'
PROMPT=${PROMPT:-$DEFAULT_PROMPT}
status=0
s2r_launch train/dreambooth_sequential.py --pretrained_model_name_or_path "$MODEL" --shard_dir "$SHARDS" \
  --stages "${CATEGORIES:-cat,dog,helicopter,hamburger}" --steps_per_stage "$STEPS" --instance_prompt "$PROMPT" ${RESOLUTION:+--resolution "$RESOLUTION"} ${PRECISION:+--mixed_precision "$PRECISION"} \
  --checkpointing_steps "${CHECKPOINT_STEPS:-100}" "$@" --output_dir "$OUTPUT" --resume_from_checkpoint "${RESUME:-latest}" \
  || status=$?
s2r_finish "$OUTPUT" "$status"
