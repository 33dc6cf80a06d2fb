#!/usr/bin/env bash
# Submit the whole chain with --dependency=afterok and print the job ids:
# data_prep -> {dreambooth, dreambooth_sequential, textual_inversion, controlnet, caption}
#   -> generate (base, DreamBooth, TI, ControlNet) -> fid.
# Usage (from the repo root): SKETCHY=/data/sketchy bash slurm/pipeline.sh [extra sbatch flags, e.g. --partition gpu]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs
DATA=${DATA:-data}
RUNS=${RUNS:-runs}
MODEL=${MODEL:-runwayml/stable-diffusion-v1-5}
export DATA MODEL SHARDS="$DATA/shards"

submit() {  # submit [--dependency ...] SCRIPT: prints the job id
  sbatch --parsable "$@" | cut -d';' -f1
}
after() { echo "--dependency=afterok:$(IFS=:; echo "$*")"; }

prep=$(submit "$@" slurm/data_prep.sh)
dreambooth=$(OUTPUT=$RUNS/dreambooth_cat submit "$@" "$(after "$prep")" slurm/dreambooth.sh)
sequential=$(OUTPUT=$RUNS/dreambooth_sequential submit "$@" "$(after "$prep")" slurm/dreambooth_sequential.sh)
ti=$(OUTPUT=$RUNS/textual_inversion submit "$@" "$(after "$prep")" slurm/textual_inversion.sh)
controlnet=$(OUTPUT=$RUNS/controlnet submit "$@" "$(after "$prep")" slurm/controlnet.sh)
caption=$(OUTPUT=$RUNS/captions submit "$@" "$(after "$prep")" slurm/caption.sh)
gen_base=$(OUTPUT=$RUNS/gen_captions submit "$@" "$(after "$caption")" slurm/generate.sh --captions "$RUNS/captions/captions.jsonl")
gen_db=$(MODEL=$RUNS/dreambooth_cat OUTPUT=$RUNS/gen_dreambooth submit "$@" "$(after "$dreambooth")" slurm/generate.sh \
  --prompt_template "a {category} in the style of sks")
gen_ti=$(OUTPUT=$RUNS/gen_textual_inversion submit "$@" "$(after "$ti")" slurm/generate.sh \
  --textual_inversion "$RUNS/textual_inversion/learned_embeds.safetensors" --prompt_template "a {category} in the style of <sketch>")
gen_cn=$(OUTPUT=$RUNS/gen_controlnet submit "$@" "$(after "$controlnet")" slurm/generate.sh \
  --controlnet "$RUNS/controlnet" --prompt_template "a photo of a {category}")
GENERATED="captions=$RUNS/gen_captions dreambooth=$RUNS/gen_dreambooth textual_inversion=$RUNS/gen_textual_inversion controlnet=$RUNS/gen_controlnet"
fid=$(GENERATED=$GENERATED OUTPUT=$RUNS/fid submit "$@" "$(after "$gen_base" "$gen_db" "$gen_ti" "$gen_cn")" slurm/fid.sh)
cat <<IDS
data_prep            $prep
dreambooth           $dreambooth
dreambooth_sequential $sequential
textual_inversion    $ti
controlnet           $controlnet
caption              $caption
generate (captions)  $gen_base
generate (dreambooth) $gen_db
generate (TI)        $gen_ti
generate (controlnet) $gen_cn
fid                  $fid   -> $RUNS/fid/report.md
IDS
