#!/usr/bin/env bash
# Images from captions, templates or prompts (resumable). MODEL=runs/dreambooth_cat sbatch slurm/generate.sh --prompt_template 'a {category} in the style of sks'
#SBATCH --job-name=s2r-generate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${SKETCH2REAL_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
s2r_launch infer/generate.py --pretrained_model_name_or_path "${MODEL:-$S2R_DEFAULT_MODEL}" \
  --shard_dir "${SHARDS:-data/shards}" --split "${SPLIT:-test}" ${PRECISION:+--mixed_precision "$PRECISION"} "$@" \
  --output_dir "${OUTPUT:-runs/generated}"
