#!/usr/bin/env bash
# Submit the whole chain with --dependency=afterok and print the job ids:
# data_prep -> {dreambooth, dreambooth_sequential, textual_inversion, controlnet, captions}
#   -> generate (one set per method) -> fid (the style sets against the test sketches, as the study scored them:
#   RUNS/fid) and fid_controlnet (the ControlNet's photos against the test photos: RUNS/fid_controlnet).
# Usage (from the repo root): SKETCHY=/data/sketchy bash slurm/pipeline.sh [sbatch flags for every job, e.g.
#   --partition gpu --nodes 2]
#   STAGES="dreambooth captions"  only these methods (default: all five), each with its generation, then one fid
#   CONFIGS=dir                   dir/JOB.yaml (JOB: dreambooth, dreambooth_sequential, textual_inversion,
#                                 controlnet, caption, generate, fid) passed as --config to that job's script:
#                                 its values win over the script's variables and defaults (STEPS, PRECISION...)
#   MODEL, CAPTION_MODEL, CATEGORIES, ...: each job script's own settings (see its header), passed on by sbatch
set -euo pipefail
# bash before 4.4 (RHEL/CentOS 7) calls an empty array unbound under -u: this script expands possibly empty ones
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) || set +u
cd "$(dirname "$0")/.."
mkdir -p logs
DATA=${DATA:-data}
RUNS=${RUNS:-runs}
ALL_STAGES="dreambooth dreambooth_sequential textual_inversion controlnet captions"
STAGES=${STAGES:-$ALL_STAGES}
fail() { echo "pipeline.sh: error: $*" >&2; exit 2; }
# before any job is submitted: a misspelt stage or config was left out, the chain ran without it (exit 0)
for stage in $STAGES; do
  [[ " $ALL_STAGES " == *" $stage "* ]] || fail "STAGES: unknown stage '$stage' (choose from: $ALL_STAGES)"
done
if [ -n "${CONFIGS:-}" ]; then
  [ -d "$CONFIGS" ] || fail "CONFIGS=$CONFIGS is not a folder"
  CONFIG_JOBS="dreambooth dreambooth_sequential textual_inversion controlnet caption generate fid"
  for file in "$CONFIGS"/*.yaml "$CONFIGS"/*.yml; do
    [ -e "$file" ] || continue
    name=$(basename "$file")
    [[ " $CONFIG_JOBS " == *" ${name%.yaml} "* ]] || fail "CONFIGS: $file is no job's (give JOB.yaml, JOB one of: $CONFIG_JOBS)"
  done
fi
# MODEL, when set, reaches every job through the environment; unset, each job loads its default (slurm/common.sh)
export DATA SHARDS="$DATA/shards"

submit() {  # submit [--dependency ...] SCRIPT: prints the job id
  sbatch --parsable "$@" | cut -d';' -f1
}
after() { echo "--dependency=afterok:$(IFS=:; echo "$*")"; }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }
config() {  # config JOB: the --config flag of JOB's script, when CONFIGS has one
  if [ -n "${CONFIGS:-}" ] && [ -f "$CONFIGS/$1.yaml" ]; then printf -- '--config\n%s\n' "$CONFIGS/$1.yaml"; fi
}
# Read into arrays: a CONFIGS path with spaces stays one word.
mapfile -t gen_config < <(config generate)

sbatch_flags=("$@")
prep=$(submit "${sbatch_flags[@]}" slurm/data_prep.sh)
ids=("data_prep            $prep")
generations=() sets=() controlnet_generation=""
generate() {  # generate NAME AFTER_JOB [ENV=VALUE ...] -- FLAGS...: a generation job after AFTER_JOB
  local name=$1 dependency=$2
  shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local job
  job=$(env "${envs[@]}" OUTPUT="$RUNS/gen_$name" sbatch --parsable "${sbatch_flags[@]}" "$(after "$dependency")" \
    slurm/generate.sh "${gen_config[@]}" "$@" | cut -d';' -f1)
  if [ "$name" = controlnet ]; then
    controlnet_generation=$job  # photos: scored against the test photos, in a job of its own
  else
    generations+=("$job")
    sets+=("$name=$RUNS/gen_$name")
  fi
  ids+=("generate ($name)    $job")
}
if wanted dreambooth; then
  mapfile -t job_config < <(config dreambooth)
  dreambooth_output=$RUNS/dreambooth_${CATEGORY:-cat}  # slurm/dreambooth.sh's category
  job=$(OUTPUT=$dreambooth_output submit "${sbatch_flags[@]}" "$(after "$prep")" slurm/dreambooth.sh "${job_config[@]}")
  ids+=("dreambooth           $job")
  template="a {category} in the style of sks"
  if [ "${CATEGORY:-cat}" = all ]; then template="a sks sketch of a {category}"; fi  # slurm/dreambooth.sh's prompt for all
  generate dreambooth "$job" -- --pretrained_model_name_or_path "$dreambooth_output" --prompt_template "$template"
fi
if wanted dreambooth_sequential; then
  mapfile -t job_config < <(config dreambooth_sequential)
  job=$(OUTPUT=$RUNS/dreambooth_sequential submit "${sbatch_flags[@]}" "$(after "$prep")" slurm/dreambooth_sequential.sh \
    "${job_config[@]}")
  ids+=("dreambooth_sequential $job")
fi
if wanted textual_inversion; then
  mapfile -t job_config < <(config textual_inversion)
  job=$(OUTPUT=$RUNS/textual_inversion submit "${sbatch_flags[@]}" "$(after "$prep")" slurm/textual_inversion.sh \
    "${job_config[@]}")
  ids+=("textual_inversion    $job")
  generate textual_inversion "$job" -- --textual_inversion "$RUNS/textual_inversion/learned_embeds.safetensors" \
    --prompt_template "a {category} in the style of ${TOKEN:-<sketch>}"  # slurm/textual_inversion.sh's token
fi
if wanted controlnet; then
  mapfile -t job_config < <(config controlnet)
  job=$(OUTPUT=$RUNS/controlnet submit "${sbatch_flags[@]}" "$(after "$prep")" slurm/controlnet.sh "${job_config[@]}")
  ids+=("controlnet           $job")
  generate controlnet "$job" -- --controlnet "$RUNS/controlnet" --prompt_template "a photo of a {category}"
fi
if wanted captions; then
  mapfile -t job_config < <(config caption)
  job=$(OUTPUT=$RUNS/captions submit "${sbatch_flags[@]}" "$(after "$prep")" slurm/caption.sh "${job_config[@]}")
  ids+=("caption              $job")
  generate captions "$job" -- --captions "$RUNS/captions/captions.jsonl"
fi
mapfile -t job_config < <(config fid)
if [ ${#generations[@]} -gt 0 ]; then
  job=$(OUTPUT=$RUNS/fid submit "${sbatch_flags[@]}" "$(after "${generations[@]}")" \
    slurm/fid.sh "${job_config[@]}" --generated "${sets[@]}" --reference_field sketch)
  ids+=("fid                  $job   -> $RUNS/fid/report.md")
fi
if [ -n "$controlnet_generation" ]; then
  job=$(OUTPUT=$RUNS/fid_controlnet submit "${sbatch_flags[@]}" "$(after "$controlnet_generation")" \
    slurm/fid.sh "${job_config[@]}" --generated "controlnet=$RUNS/gen_controlnet" --reference_field photo)
  ids+=("fid_controlnet       $job   -> $RUNS/fid_controlnet/report.md")
fi
printf '%s\n' "${ids[@]}"
