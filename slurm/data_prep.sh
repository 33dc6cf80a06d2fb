#!/usr/bin/env bash
# Splits + shards of a Sketchy release (CPU only). SKETCHY=/data/sketchy DATA=data sbatch slurm/data_prep.sh
#SBATCH --job-name=s2r-data-prep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${SKETCH2REAL_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
SKETCHY=${SKETCHY:-data/sketchy}
DATA=${DATA:-data}
# extra flags go to the step that takes them: build_splits.py's (--categories, --keep_invalid...) or make_shards.py's
"$PYTHON" data_prep/prepare.py --data_dir "$DATA" --sketchy_root "$SKETCHY" --seed "${SEED:-0}" \
  --val_fraction "${VAL_FRACTION:-0.1}" --num_workers "${SLURM_CPUS_PER_TASK:-4}" --max_samples_per_shard "${SHARD_SIZE:-1000}" \
  "$@"
