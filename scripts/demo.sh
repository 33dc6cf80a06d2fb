#!/usr/bin/env bash
# The whole pipeline on its embedded default: tiny offline models + a synthetic Sketchy release, on CPU.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]   (default: demo/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_HOME="$OUT/tiny_models/torch_home"
PY=${PYTHON:-python3}
COMMON_TRAIN=(--resolution 64 --report_to tensorboard --validation_inference_steps 10 --num_validation_images 2)
step() { printf '\n== %s\n' "$*"; }

step "tiny models, and the tiny base trained on a synthetic Sketchy (~6 min the first time; cached)"
$PY -m sketch2real.testing.build --output_dir "$OUT/tiny_models" --pretrain
SD="$OUT/tiny_models/tiny-sd-trained"

step "synthetic Sketchy release"
$PY data_prep/make_synthetic_sketchy.py --output_dir "$OUT/sketchy" --categories airplane apple car_\(sedan\) cat hot-air_balloon \
  --photos_per_category 12 --sketches_per_photo 3 --test_photos_per_category 4

step "splits"
$PY data_prep/build_splits.py --sketchy_root "$OUT/sketchy" --output_dir "$OUT/splits" --val_fraction 0.2 --seed 0

step "shards"
$PY data_prep/make_shards.py --splits_dir "$OUT/splits" --sketchy_root "$OUT/sketchy" --output_dir "$OUT/shards" \
  --max_samples_per_shard 32 --num_workers 2

step "DreamBooth (cat sketches)"
$PY train/dreambooth.py --pretrained_model_name_or_path "$SD" --shard_dir "$OUT/shards" --instance_category cat \
  --instance_prompt "a cat in the style of sks" --output_dir "$OUT/dreambooth_cat" --max_train_steps 100 \
  --learning_rate 1e-3 --train_batch_size 4 --validation_steps 50 --checkpointing_steps 50 "${COMMON_TRAIN[@]}"

step "sequential DreamBooth (cat, apple, airplane)"
$PY train/dreambooth_sequential.py --pretrained_model_name_or_path "$SD" --shard_dir "$OUT/shards" \
  --stages cat,apple,airplane --steps_per_stage 60 --instance_prompt "a {category} in the style of sks" \
  --output_dir "$OUT/dreambooth_sequential" --learning_rate 2e-3 --train_batch_size 4 --validation_steps 0 \
  --checkpointing_steps 0 "${COMMON_TRAIN[@]}"

step "Textual Inversion (<sketch> style, all categories)"
$PY train/textual_inversion.py --pretrained_model_name_or_path "$SD" --shard_dir "$OUT/shards" \
  --placeholder_token "<sketch>" --initializer_token sketch --output_dir "$OUT/textual_inversion" --max_train_steps 60 \
  --learning_rate 5e-2 --train_batch_size 4 --validation_steps 30 --checkpointing_steps 30 "${COMMON_TRAIN[@]}"

step "style LoRA (DoRA, EMA) over every category ('a {category} in the style of sks', each image its category's prompt)"
$PY train/dreambooth.py --pretrained_model_name_or_path "$SD" --shard_dir "$OUT/shards" \
  --instance_prompt "a {category} in the style of sks" --lora_rank 8 --use_dora --use_ema --learning_rate 1e-2 \
  --caption_dropout_probability 0.1 --output_dir "$OUT/style_lora" --max_train_steps 150 --train_batch_size 8 \
  --validation_steps 150 --checkpointing_steps 0 "${COMMON_TRAIN[@]}"

step "ControlNet (sketch -> photo; half the prompts empty, so the sketch must carry the image)"
$PY train/controlnet.py --pretrained_model_name_or_path "$SD" --shard_dir "$OUT/shards" --output_dir "$OUT/controlnet" \
  --max_train_steps 400 --learning_rate 5e-3 --train_batch_size 8 --proportion_empty_prompts 0.5 --validation_steps 400 \
  --checkpointing_steps 200 --num_validation_sketches 4 --num_heldout_samples 32 "${COMMON_TRAIN[@]}"

step "captions of the test sketches (tiny LLaVA and BLIP-2)"
$PY infer/caption.py --model_name_or_path "$OUT/tiny_models/tiny-llava" --shard_dir "$OUT/shards" --split test \
  --prompts best --max_new_tokens 20 --output_dir "$OUT/captions_llava"
$PY infer/caption.py --model_name_or_path "$OUT/tiny_models/tiny-blip2" --shard_dir "$OUT/shards" --split test \
  --prompts 1 --max_new_tokens 20 --output_dir "$OUT/captions_blip2"

step "generation: base model, DreamBooth, Textual Inversion, style LoRA (EMA and without), ControlNet, captions"
GEN=(--shard_dir "$OUT/shards" --split test --height 64 --width 64 --num_inference_steps 20 --guidance_scale 4 --batch_size 16)
$PY infer/generate.py --pretrained_model_name_or_path "$SD" --prompt_template "a {category}" --categories cat \
  --num_images_per_prompt 2 "${GEN[@]}" --output_dir "$OUT/gen_base_cat"
$PY infer/generate.py --pretrained_model_name_or_path "$OUT/dreambooth_cat" --prompt_template "a {category} in the style of sks" \
  --categories cat --num_images_per_prompt 2 "${GEN[@]}" --output_dir "$OUT/gen_dreambooth"
$PY infer/generate.py --pretrained_model_name_or_path "$SD" --prompt_template "a {category}" "${GEN[@]}" --output_dir "$OUT/gen_base"
$PY infer/generate.py --pretrained_model_name_or_path "$SD" --textual_inversion "$OUT/textual_inversion/learned_embeds.safetensors" \
  --prompt_template "a {category} in the style of <sketch>" "${GEN[@]}" --output_dir "$OUT/gen_textual_inversion"
$PY infer/generate.py --pretrained_model_name_or_path "$OUT/style_lora" \
  --prompt_template "a {category} in the style of sks" "${GEN[@]}" --output_dir "$OUT/gen_style_lora"
$PY infer/generate.py --pretrained_model_name_or_path "$OUT/style_lora/without_ema" \
  --prompt_template "a {category} in the style of sks" "${GEN[@]}" --output_dir "$OUT/gen_style_lora_without_ema"
$PY infer/generate.py --pretrained_model_name_or_path "$SD" --prompt_template "a photo of a {category}" "${GEN[@]}" \
  --output_dir "$OUT/gen_base_photo"
$PY infer/generate.py --pretrained_model_name_or_path "$SD" --controlnet "$OUT/controlnet" \
  --prompt_template "a photo of a {category}" "${GEN[@]}" --output_dir "$OUT/gen_controlnet"
$PY infer/generate.py --pretrained_model_name_or_path "$SD" --captions "$OUT/captions_llava/captions.jsonl" \
  --prompt_ids 5 "${GEN[@]}" --output_dir "$OUT/gen_captions"

step "evaluation: FID / KID with 95% intervals, set against set"
EVAL=(--reference_shards "$OUT/shards" --reference_split test --dims 64 --cache_dir "$OUT/fid_cache")
$PY eval/fid.py --generated "base=$OUT/gen_base_cat" "dreambooth=$OUT/gen_dreambooth" --reference_field sketch \
  --categories cat "${EVAL[@]}" --output_dir "$OUT/eval_dreambooth"
$PY eval/fid.py --generated "base=$OUT/gen_base" "textual_inversion=$OUT/gen_textual_inversion" \
  "style_lora=$OUT/gen_style_lora" "style_lora_without_ema=$OUT/gen_style_lora_without_ema" --reference_field sketch \
  --metrics fid kid sketchiness csd clip_accuracy --clip_model_name_or_path "$OUT/tiny_models/tiny-clip" \
  --csd_model_name_or_path "$OUT/tiny_models/tiny-csd" "${EVAL[@]}" --output_dir "$OUT/eval_textual_inversion"
$PY eval/fid.py --generated "base=$OUT/gen_base_photo" "controlnet=$OUT/gen_controlnet" "captions=$OUT/gen_captions" \
  --reference_field photo "${EVAL[@]}" --output_dir "$OUT/eval_photos"

step "report"
$PY scripts/demo_report.py "$OUT"
echo "split report:          $OUT/splits/report.md"
echo "metric tables:         $OUT/eval_*/report.md (charts: $OUT/eval_*/fid_per_category.png)"
echo "forgetting table:      $OUT/dreambooth_sequential/sequential_report.md"
echo "caption quality:       $OUT/captions_llava/quality.md, $OUT/captions_blip2/quality.md"
echo "mosaics:               $OUT/gen_*/mosaics/ (sketch | generated | photo), $OUT/*/validation/"
