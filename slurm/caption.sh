#!/usr/bin/env bash
# Captions of the test sketches (resumable: a rerun captions only what is missing). CAPTION_MODEL=llava-hf/llava-1.5-7b-hf sbatch slurm/caption.sh
# CAPTION_MODEL, not MODEL: MODEL is the diffusion model of the other jobs (slurm/pipeline.sh exports it).
# PROMPTS: prompt ids or names of the library, space-separated (PROMPTS="4 5 8"); a prompt of your own words goes
# after the script, as a flag: sbatch slurm/caption.sh --prompts "Describe the sketch."
#SBATCH --job-name=s2r-caption
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
OUTPUT=${OUTPUT:-runs/captions}
read -ra prompts <<< "${PROMPTS:-best}"  # "4 5 8" was one prompt, its words the text asked
status=0
s2r_launch infer/caption.py --model_name_or_path "${CAPTION_MODEL:-llava-hf/llava-1.5-7b-hf}" --shard_dir "${SHARDS:-data/shards}" \
  --split "${SPLIT:-test}" --prompts "${prompts[@]}" ${PRECISION:+--mixed_precision "$PRECISION"} "$@" \
  --output_dir "$OUTPUT" || status=$?
# a signal before the time limit (or a preemption) stops it at a batch: requeued, it skips what is written
s2r_finish "$OUTPUT" "$status"
