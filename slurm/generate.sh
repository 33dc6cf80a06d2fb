#!/usr/bin/env bash
# Images from captions, templates or prompts (resumable). MODEL=runs/dreambooth_cat sbatch slurm/generate.sh --prompt_template 'a {category} in the style of sks'
#SBATCH --job-name=s2r-generate
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
OUTPUT=${OUTPUT:-runs/generated}
status=0
s2r_launch infer/generate.py --pretrained_model_name_or_path "${MODEL:-$S2R_DEFAULT_MODEL}" \
  --shard_dir "${SHARDS:-data/shards}" --split "${SPLIT:-test}" ${PRECISION:+--mixed_precision "$PRECISION"} "$@" \
  --output_dir "$OUTPUT" || status=$?
# a signal before the time limit (or a preemption) stops it at a batch: requeued, it skips what is written
s2r_finish "$OUTPUT" "$status"
