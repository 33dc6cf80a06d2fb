#!/usr/bin/env bash
# Sketch -> photo ControlNet on Sketchy pairs: sbatch slurm/controlnet.sh
# Settings by environment (MODEL, SHARDS, OUTPUT, STEPS, PRECISION, ...); extra flags after the script name.
#SBATCH --job-name=s2r-controlnet
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
OUTPUT=${OUTPUT:-runs/controlnet}
STEPS=${STEPS:-20000}
DEFAULT_PROMPT_TEMPLATE='a photo of a {category}'
PROMPT_TEMPLATE=${PROMPT_TEMPLATE:-$DEFAULT_PROMPT_TEMPLATE}
status=0
s2r_launch train/controlnet.py --pretrained_model_name_or_path "$MODEL" --shard_dir "$SHARDS" \
  --prompt_template "$PROMPT_TEMPLATE" --max_train_steps "$STEPS" ${RESOLUTION:+--resolution "$RESOLUTION"} ${PRECISION:+--mixed_precision "$PRECISION"} \
  --checkpointing_steps "${CHECKPOINT_STEPS:-100}" "$@" --output_dir "$OUTPUT" --resume_from_checkpoint "${RESUME:-latest}" \
  || status=$?
s2r_finish "$OUTPUT" "$status"
