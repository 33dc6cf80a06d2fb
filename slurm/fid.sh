#!/usr/bin/env bash
# FID/KID of generated folders against the test photos. GENERATED='base=runs/generated' sbatch slurm/fid.sh
# Preempted, it is requeued and starts again (the reference's features are cached: --cache_dir).
# DINOV2_MODEL, CLIP_MODEL: the extractors of fd_dinov2/prdc and cmmd/clip_* (hub id or folder; default eval/fid.py's)
#SBATCH --job-name=s2r-fid
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
# bash before 4.4 (RHEL/CentOS 7) calls an empty array unbound under -u: this script expands possibly empty ones
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) || set +u
# shellcheck source=slurm/common.sh
source "${SKETCH2REAL_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
EXTRACTORS=()
[[ -n "${DINOV2_MODEL:-}" ]] && EXTRACTORS+=(--dinov2_model_name_or_path "$DINOV2_MODEL")
[[ -n "${CLIP_MODEL:-}" ]] && EXTRACTORS+=(--clip_model_name_or_path "$CLIP_MODEL")
# shellcheck disable=SC2086  # GENERATED holds several NAME=DIR words
s2r_launch eval/fid.py --generated ${GENERATED:-runs/generated} --reference_shards "${SHARDS:-data/shards}" \
  --reference_split "${SPLIT:-test}" --reference_field "${FIELD:-photo}" "${EXTRACTORS[@]}" "$@" \
  --output_dir "${OUTPUT:-runs/fid}"
