#!/usr/bin/env bash
# The whole pipeline on its embedded default: tiny offline models + a synthetic Sketchy release, on CPU.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]   (default: demo/)
# Steps that do not depend on each other run side by side, DEMO_JOBS at a time (default 2), each with its share of
# the cores; each step's output goes to OUTPUT_DIR/logs/<step>.log.
set -euo pipefail
# bash before 4.4 (RHEL/CentOS 7) calls an empty array unbound under -u: this script expands possibly empty ones
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) || set +u
cd "$(dirname "$0")/.."
OUT=${1:-demo}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_HOME="$OUT/tiny_models/torch_home"
PY=${PYTHON:-python3}
JOBS=${DEMO_JOBS:-2}
CORES=$(nproc)
THREADS=$(( CORES / JOBS > 0 ? CORES / JOBS : 1 ))  # two steps with two threads each on two cores run many times slower
LOGS="$OUT/logs"
mkdir -p "$LOGS"
COMMON_TRAIN=(--resolution 64 --report_to tensorboard --validation_inference_steps 10 --num_validation_images 2)
START=$SECONDS
declare -A PIDS STARTED
step() { printf '\n== %s (%d s)\n' "$*" $(( SECONDS - START )); }
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
# start NAME COMMAND...: run COMMAND in the background (at most JOBS at once), its output in $LOGS/NAME.log
start() {
  local name=$1; shift
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
  printf '   %-34s started  (%d s)\n' "$name" $(( SECONDS - START ))
  rm -f "$LOGS/$name.status"
  ( set +e; OMP_NUM_THREADS=$THREADS "$@" > "$LOGS/$name.log" 2>&1; echo "$? $SECONDS" > "$LOGS/$name.status" ) &
  PIDS[$name]=$! STARTED[$name]=$SECONDS
}
# after NAME...: wait for these steps; a failed one stops the demo with the end of its log
after() {
  local name
  for name; do
    wait "${PIDS[$name]}" 2>/dev/null || true
    local status=1 ended=$SECONDS
    { read -r status ended < "$LOGS/$name.status"; } 2>/dev/null || true
    if [ "$status" != 0 ]; then
      printf '\nerror: step %s failed; the end of %s:\n' "$name" "$LOGS/$name.log" >&2
      tail -n 25 "$LOGS/$name.log" >&2
      exit 1
    fi
    printf '   %-34s done     (%d s, took %d s)\n' "$name" $(( ended - START )) $(( ended - STARTED[$name] ))
  done
}

step "synthetic Sketchy release, splits, shards"
$PY data_prep/make_synthetic_sketchy.py --output_dir "$OUT/sketchy" --categories airplane apple car_\(sedan\) cat hot-air_balloon \
  --photos_per_category 12 --sketches_per_photo 3 --test_photos_per_category 4
$PY data_prep/build_splits.py --sketchy_root "$OUT/sketchy" --output_dir "$OUT/splits" --val_fraction 0.2 --seed 0
$PY data_prep/make_shards.py --splits_dir "$OUT/splits" --sketchy_root "$OUT/sketchy" --output_dir "$OUT/shards" \
  --max_samples_per_shard 32 --num_workers 2

step "tiny models, and the tiny base trained on a synthetic Sketchy (~6 min the first time; cached)"
$PY -m sketch2real.testing.build --output_dir "$OUT/tiny_models" --pretrain
SD="$OUT/tiny_models/tiny-sd-trained"

step "training, captioning, generation and evaluation, $JOBS steps at a time ($THREADS thread(s) each; logs: $LOGS/)"
# ControlNet first: the longest step. Sketch -> photo; half the prompts empty, so the sketch must carry the image.
start controlnet "$PY" train/controlnet.py --pretrained_model_name_or_path "$SD" --shard_dir "$OUT/shards" \
  --output_dir "$OUT/controlnet" --max_train_steps 400 --learning_rate 5e-3 --train_batch_size 8 \
  --proportion_empty_prompts 0.5 --validation_steps 400 --checkpointing_steps 200 --num_validation_sketches 4 \
  --num_heldout_samples 32 "${COMMON_TRAIN[@]}"
# DreamBooth on the cat sketches
start dreambooth_cat "$PY" train/dreambooth.py --pretrained_model_name_or_path "$SD" --shard_dir "$OUT/shards" \
  --instance_category cat --instance_prompt "a cat in the style of sks" --output_dir "$OUT/dreambooth_cat" \
  --max_train_steps 100 --learning_rate 1e-3 --train_batch_size 4 --validation_steps 50 --checkpointing_steps 50 \
  "${COMMON_TRAIN[@]}"
# A style LoRA (DoRA, EMA) over every category: each image gets its category's prompt 'a {category} in the style of sks'
start style_lora "$PY" train/dreambooth.py --pretrained_model_name_or_path "$SD" --shard_dir "$OUT/shards" \
  --instance_prompt "a {category} in the style of sks" --lora_rank 8 --use_dora --use_ema --learning_rate 1e-2 \
  --caption_dropout_probability 0.1 --output_dir "$OUT/style_lora" --max_train_steps 150 --train_batch_size 8 \
  --validation_steps 150 --checkpointing_steps 0 "${COMMON_TRAIN[@]}"
# Sequential DreamBooth: cat, apple, airplane, forgetting measured after each stage
start dreambooth_sequential "$PY" train/dreambooth_sequential.py --pretrained_model_name_or_path "$SD" \
  --shard_dir "$OUT/shards" --stages cat,apple,airplane --steps_per_stage 60 \
  --instance_prompt "a {category} in the style of sks" --output_dir "$OUT/dreambooth_sequential" --learning_rate 2e-3 \
  --train_batch_size 4 --validation_steps 0 --checkpointing_steps 0 "${COMMON_TRAIN[@]}"
# Textual Inversion: a <sketch> style token over all categories
start textual_inversion "$PY" train/textual_inversion.py --pretrained_model_name_or_path "$SD" --shard_dir "$OUT/shards" \
  --placeholder_token "<sketch>" --initializer_token sketch --output_dir "$OUT/textual_inversion" --max_train_steps 60 \
  --learning_rate 5e-2 --train_batch_size 4 --validation_steps 30 --checkpointing_steps 30 "${COMMON_TRAIN[@]}"
# Captions of the test sketches (tiny LLaVA and BLIP-2)
start captions_llava "$PY" infer/caption.py --model_name_or_path "$OUT/tiny_models/tiny-llava" --shard_dir "$OUT/shards" \
  --split test --prompts best --max_new_tokens 20 --output_dir "$OUT/captions_llava"
start captions_blip2 "$PY" infer/caption.py --model_name_or_path "$OUT/tiny_models/tiny-blip2" --shard_dir "$OUT/shards" \
  --split test --prompts 1 --max_new_tokens 20 --output_dir "$OUT/captions_blip2"

# Generation: the base model, then each trained model as soon as it is there
GEN=(--shard_dir "$OUT/shards" --split test --height 64 --width 64 --num_inference_steps 20 --guidance_scale 4 --batch_size 16)
start gen_base_cat "$PY" infer/generate.py --pretrained_model_name_or_path "$SD" --prompt_template "a {category}" \
  --categories cat --num_images_per_prompt 2 "${GEN[@]}" --output_dir "$OUT/gen_base_cat"
start gen_base "$PY" infer/generate.py --pretrained_model_name_or_path "$SD" --prompt_template "a {category}" "${GEN[@]}" \
  --output_dir "$OUT/gen_base"
start gen_base_photo "$PY" infer/generate.py --pretrained_model_name_or_path "$SD" --prompt_template "a photo of a {category}" \
  "${GEN[@]}" --output_dir "$OUT/gen_base_photo"
after dreambooth_cat
start gen_dreambooth "$PY" infer/generate.py --pretrained_model_name_or_path "$OUT/dreambooth_cat" \
  --prompt_template "a {category} in the style of sks" --categories cat --num_images_per_prompt 2 "${GEN[@]}" \
  --output_dir "$OUT/gen_dreambooth"
after style_lora
start gen_style_lora "$PY" infer/generate.py --pretrained_model_name_or_path "$OUT/style_lora" \
  --prompt_template "a {category} in the style of sks" "${GEN[@]}" --output_dir "$OUT/gen_style_lora"
start gen_style_lora_without_ema "$PY" infer/generate.py --pretrained_model_name_or_path "$OUT/style_lora/without_ema" \
  --prompt_template "a {category} in the style of sks" "${GEN[@]}" --output_dir "$OUT/gen_style_lora_without_ema"
after textual_inversion
start gen_textual_inversion "$PY" infer/generate.py --pretrained_model_name_or_path "$SD" \
  --textual_inversion "$OUT/textual_inversion/learned_embeds.safetensors" \
  --prompt_template "a {category} in the style of <sketch>" "${GEN[@]}" --output_dir "$OUT/gen_textual_inversion"
after captions_llava
start gen_captions "$PY" infer/generate.py --pretrained_model_name_or_path "$SD" \
  --captions "$OUT/captions_llava/captions.jsonl" --prompt_ids 5 "${GEN[@]}" --output_dir "$OUT/gen_captions"
after controlnet
start gen_controlnet "$PY" infer/generate.py --pretrained_model_name_or_path "$SD" --controlnet "$OUT/controlnet" \
  --prompt_template "a photo of a {category}" "${GEN[@]}" --output_dir "$OUT/gen_controlnet"

# Evaluation: FID / KID with 95% intervals, set against set
EVAL=(--reference_shards "$OUT/shards" --reference_split test --dims 64 --cache_dir "$OUT/fid_cache")
after gen_base_cat gen_dreambooth
STYLE=(--metrics fid kid sketchiness csd clip_accuracy --clip_model_name_or_path "$OUT/tiny_models/tiny-clip"
  --csd_model_name_or_path "$OUT/tiny_models/tiny-csd")
start eval_dreambooth "$PY" eval/fid.py --generated "base=$OUT/gen_base_cat" "dreambooth=$OUT/gen_dreambooth" \
  --reference_field sketch --categories cat "${STYLE[@]}" "${EVAL[@]}" --output_dir "$OUT/eval_dreambooth"
after gen_base gen_textual_inversion gen_style_lora gen_style_lora_without_ema
start eval_textual_inversion "$PY" eval/fid.py --generated "base=$OUT/gen_base" \
  "textual_inversion=$OUT/gen_textual_inversion" "style_lora=$OUT/gen_style_lora" \
  "style_lora_without_ema=$OUT/gen_style_lora_without_ema" --reference_field sketch "${STYLE[@]}" "${EVAL[@]}" \
  --output_dir "$OUT/eval_textual_inversion"
after gen_base_photo gen_controlnet gen_captions
start eval_photos "$PY" eval/fid.py --generated "base=$OUT/gen_base_photo" "controlnet=$OUT/gen_controlnet" \
  "captions=$OUT/gen_captions" --reference_field photo "${EVAL[@]}" --output_dir "$OUT/eval_photos"
after dreambooth_sequential captions_blip2 eval_dreambooth eval_textual_inversion eval_photos

step "report"
$PY scripts/demo_report.py "$OUT"
echo "split report:          $OUT/splits/report.md"
echo "metric tables:         $OUT/eval_*/report.md (charts: $OUT/eval_*/fid_per_category.png)"
echo "forgetting table:      $OUT/dreambooth_sequential/sequential_report.md"
echo "caption quality:       $OUT/captions_llava/quality.md, $OUT/captions_blip2/quality.md"
echo "mosaics:               $OUT/gen_*/mosaics/ (sketch | generated | photo), $OUT/*/validation/"
echo "each step's log:       $LOGS/"
printf 'demo done in %d s\n' $(( SECONDS - START ))
