#!/usr/bin/env bash
# The training step on one CUDA GPU in one command, ours against diffusers' example script: prints one table.
# Flags: see bench/gpu_speed.py --help (--diffusers_dir PATH: where examples/dreambooth/train_dreambooth.py is).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_speed.py "$@"
