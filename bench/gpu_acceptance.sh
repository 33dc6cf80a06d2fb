#!/usr/bin/env bash
# GPU acceptance in one command (a CUDA machine): every trainer x {bf16, fp16} x {SDPA, xformers} on a full-size
# SD 1.5-architecture model with random weights; prints a table. Flags: see bench/gpu_acceptance.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_acceptance.py "$@"
