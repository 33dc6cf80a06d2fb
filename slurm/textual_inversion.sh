#!/usr/bin/env bash
# Textual Inversion of the sketch style: TOKEN='<sketch>' sbatch slurm/textual_inversion.sh
# Settings by environment (MODEL, SHARDS, OUTPUT, STEPS, PRECISION, ...); extra flags after the script name.
#SBATCH --job-name=s2r-textual_inversion
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
OUTPUT=${OUTPUT:-runs/textual_inversion}
STEPS=${STEPS:-3000}
status=0
s2r_launch train/textual_inversion.py --pretrained_model_name_or_path "$MODEL" --shard_dir "$SHARDS" \
  --placeholder_token "${TOKEN:-<sketch>}" --initializer_token "${INIT:-sketch}" --max_train_steps "$STEPS" ${RESOLUTION:+--resolution "$RESOLUTION"} ${PRECISION:+--mixed_precision "$PRECISION"} \
  --checkpointing_steps "${CHECKPOINT_STEPS:-100}" "$@" --output_dir "$OUTPUT" --resume_from_checkpoint "${RESUME:-latest}" \
  || status=$?
s2r_finish "$OUTPUT" "$status"
