#!/usr/bin/env bash
# The original study's FID table (../shared/seed/STUDY-NOTES.md), every row, submitted as one chain with
# --dependency=afterok; prints the job ids. Scored against the test sketches, as the study scored, twice: in the
# study's protocol (RUNS/fid_protocol: STUDY_SAMPLES=100 drawn test sketches and the images generated for them, 2048
# dims) and over the whole test split (RUNS/fid), both with intervals.
#   rows: LLaVA captions with prompts 4, 5 and 8; DreamBooth on 3 cat sketches "a photo of a sks cat" and
#   "a cat in the style of sks"; sequential DreamBooth dog -> helicopter -> hamburger (3 sketches each);
#   Textual Inversion on cat sketches and on all categories.
# Usage (from the repo root, after slurm/data_prep.sh): bash slurm/reproduce_study.sh [sbatch flags for every job]
#   RUNS=runs/study (default)   where every row's model, images and the report go (RUNS/fid/report.md)
#   MODEL, CAPTION_MODEL, STEPS, RESOLUTION, CONFIGS=dir (dir/JOB.yaml, as slurm/pipeline.sh) ...: the job scripts'
#   (a CONFIGS value wins over the job scripts' variables and defaults; the flags that define a row win over it)
#   CATEGORY, CATEGORIES: the study's cat and dog,helicopter,hamburger; STUDY_SAMPLES: its 100 evaluation sketches
set -euo pipefail
# bash before 4.4 (RHEL/CentOS 7) calls an empty array unbound under -u: this script expands possibly empty ones
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) || set +u
cd "$(dirname "$0")/.."
mkdir -p logs
RUNS=${RUNS:-runs/study}
CATEGORY=${CATEGORY:-cat}
CATEGORIES=${CATEGORIES:-dog,helicopter,hamburger}
export SHARDS=${SHARDS:-data/shards}
flags=("$@")
ids=() generations=() sets=()
if [ -f "$SHARDS/train.json" ] && [ -f "$SHARDS/test.json" ]; then
  # data prep done: a category typo or more evaluation sketches than the test split has stop here, in one line, not in
  # the jobs that need them (the last of the chain, after every training)
  "${PYTHON:-python3}" - "$SHARDS" "$CATEGORY" "$CATEGORIES" "${STUDY_SAMPLES:-100}" <<'EOF' || exit 2
import json, sys
shards, category, categories, samples = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
index = {split: json.load(open(f"{shards}/{split}.json")) for split in ("train", "test")}
known = {c for shard in index["train"]["shards"] for c in shard["categories"]}
unknown = [c for c in (category, *categories) if c not in known]
if unknown:
    sys.exit(f"reproduce_study.sh: error: {', '.join(unknown)}: no such category in {shards}'s train split "
             "(CATEGORY, CATEGORIES; names as in Sketchy, e.g. car_(sedan))")
if samples > index["test"]["total"]:
    sys.exit(f"reproduce_study.sh: error: STUDY_SAMPLES={samples}: {shards}'s test split has "
             f"{index['test']['total']} samples")
EOF
fi

config() {  # config JOB: the --config flag of JOB's script, when CONFIGS has one
  if [ -n "${CONFIGS:-}" ] && [ -f "$CONFIGS/$1.yaml" ]; then printf -- '--config\n%s\n' "$CONFIGS/$1.yaml"; fi
}
submit() {  # submit NAME [ENV=VALUE ...] -- SBATCH_ARGS...: prints nothing, records the job id in $job
  local name=$1 envs=()
  shift
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  job=$(env "${envs[@]}" sbatch --parsable "${flags[@]}" "$@" | cut -d';' -f1)
  ids+=("$(printf '%-28s %s' "$name" "$job")")
}
mapfile -t gen_config < <(config generate)
generate() {  # generate ROW AFTER_JOB [ENV=VALUE ...] -- FLAGS...: the row's images, after AFTER_JOB
  local row=$1 after=$2
  shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  submit "generate ($row)" "${envs[@]}" OUTPUT="$RUNS/gen_$row" -- --dependency="afterok:$after" slurm/generate.sh \
    "${gen_config[@]}" "$@"
  generations+=("$job")
  sets+=("$row=$RUNS/gen_$row")
}
label=${CATEGORY//_/ }
study_template="a picture of a {category} in the style of sks"  # how the study prompted its DreamBooth models

mapfile -t job_config < <(config caption)
submit caption OUTPUT="$RUNS/captions" -- slurm/caption.sh "${job_config[@]}" --prompts 4 5 8
captions=$job
for prompt in 4 5 8; do
  generate "llava-$prompt" "$captions" -- --captions "$RUNS/captions/captions.jsonl" --prompt_ids "$prompt"
done

mapfile -t job_config < <(config dreambooth)
for row in "sks-$CATEGORY" "$CATEGORY-style-sks"; do
  if [ "$row" = "sks-$CATEGORY" ]; then prompt="a photo of a sks $label"; else prompt="a $label in the style of sks"; fi
  submit "dreambooth ($row)" OUTPUT="$RUNS/dreambooth_$row" -- slurm/dreambooth.sh "${job_config[@]}" \
    --num_instance_images 3 --instance_category "$CATEGORY" --instance_prompt "$prompt"
  generate "dreambooth-$row" "$job" -- --pretrained_model_name_or_path "$RUNS/dreambooth_$row" \
    --prompt_template "$study_template"
done

mapfile -t job_config < <(config dreambooth_sequential)
submit "dreambooth_sequential" OUTPUT="$RUNS/dreambooth_sequential" -- slurm/dreambooth_sequential.sh \
  "${job_config[@]}" --num_instance_images 3 --stages "$CATEGORIES" \
  --instance_prompt "a photo of a {category} in the style of sks"
IFS=, read -r -a stages <<< "$CATEGORIES"
last=$(printf 'stage-%02d-%s' "${#stages[@]}" "${stages[-1]}")
generate "dreambooth-sequential" "$job" -- --pretrained_model_name_or_path "$RUNS/dreambooth_sequential/$last" \
  --prompt_template "$study_template"

mapfile -t job_config < <(config textual_inversion)
for row in "$CATEGORY" all; do
  categories=()
  if [ "$row" != all ]; then categories=(--categories "$CATEGORY"); fi
  submit "textual_inversion ($row)" OUTPUT="$RUNS/textual_inversion_$row" -- slurm/textual_inversion.sh \
    "${job_config[@]}" "${categories[@]}"
  generate "textual-inversion-$row" "$job" -- --textual_inversion "$RUNS/textual_inversion_$row/learned_embeds.safetensors" \
    --prompt_template "a {category} in the style of ${TOKEN:-<sketch>}"
done

mapfile -t job_config < <(config fid)
submit fid OUTPUT="$RUNS/fid" -- --dependency="afterok:$(IFS=:; echo "${generations[*]}")" slurm/fid.sh \
  "${job_config[@]}" --dims 2048 --generated "${sets[@]}" --reference_field sketch
after_all="afterok:$(IFS=:; echo "${generations[*]}")"
submit "fid (study protocol)" OUTPUT="$RUNS/fid_protocol" -- --dependency="$after_all" slurm/fid.sh \
  "${job_config[@]}" --dims 2048 --max_samples "${STUDY_SAMPLES:-100}" --generated "${sets[@]}" --reference_field sketch
ids+=("  -> $RUNS/fid_protocol/report.md (the study's protocol), $RUNS/fid/report.md (the whole test split)")
printf '%s\n' "${ids[@]}"
