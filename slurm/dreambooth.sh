#!/usr/bin/env bash
# DreamBooth on one Sketchy category (CATEGORY=all: a style over every category of the shards, one prompt per
# category). Override any setting by environment, extra flags after the script:
#   MODEL=... SHARDS=data/shards CATEGORY=cat OUTPUT=runs/dreambooth_cat sbatch slurm/dreambooth.sh --lora_rank 8
#   CATEGORY=all sbatch slurm/dreambooth.sh --lora_rank 16      # runs/dreambooth_all, 'a sks sketch of a {category}'
#   (OUTPUT and RESUME=latest come after the flags: a --config among them sets the rest, not the job's folder)
#SBATCH --job-name=s2r-dreambooth
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
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) || set +u
# shellcheck source=slurm/common.sh
source "${SKETCH2REAL_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
MODEL=${MODEL:-$S2R_DEFAULT_MODEL}
SHARDS=${SHARDS:-data/shards}
CATEGORY=${CATEGORY:-cat}
OUTPUT=${OUTPUT:-runs/dreambooth_${CATEGORY}}
if [ "$CATEGORY" = all ]; then  # the whole split: each image prompted with its own category
  PROMPT=${PROMPT:-"a sks sketch of a {category}"}
  category_flags=()
else
  PROMPT=${PROMPT:-"a ${CATEGORY//_/ } in the style of sks"}
  category_flags=(--instance_category "$CATEGORY")
fi
STEPS=${STEPS:-400}

status=0
s2r_launch train/dreambooth.py --pretrained_model_name_or_path "$MODEL" --shard_dir "$SHARDS" \
  "${category_flags[@]}" --instance_prompt "$PROMPT" --max_train_steps "$STEPS" \
  ${RESOLUTION:+--resolution "$RESOLUTION"} ${PRECISION:+--mixed_precision "$PRECISION"} --checkpointing_steps "${CHECKPOINT_STEPS:-100}" \
  "$@" --output_dir "$OUTPUT" --resume_from_checkpoint "${RESUME:-latest}" || status=$?
s2r_finish "$OUTPUT" "$status"
