#!/usr/bin/env bash
# The demo: train SDXL LoKr, Wuerstchen v2 and Stable Cascade LoRAs on the tiny models and toy data,
# generate images, export for ComfyUI.
# Usage: scripts/demo.sh ASSETS_DIR OUT_DIR   (make demo fills these in)
set -euo pipefail
ASSETS=${1:?assets dir}
OUT=${2:?output dir}
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
LAUNCH=("$PY" -m accelerate.commands.launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
rm -rf "$OUT"

echo "== SDXL LoKr on the tiny SDXL =="
"${LAUNCH[@]}" scripts/train_sdxl_lokr.py \
  --pretrained_model_name_or_path "$ASSETS/sdxl" \
  --pretrained_vae_model_name_or_path "$ASSETS/sdxl-vae-fp16-fix" \
  --train_data_dir "$ASSETS/data" \
  --output_dir "$OUT/sdxl_lokr" \
  --resolution 64 --random_flip --train_batch_size 4 --max_train_steps 40 \
  --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 4 --snr_gamma 5.0 \
  --checkpointing_steps 20 --validation_steps 20 --validation_inference_steps 10 \
  --validation_prompt "a red circle on a blue background" --num_validation_images 2 \
  --seed 0

echo "== Wuerstchen prior LoRA on the tiny Wuerstchen =="
"${LAUNCH[@]}" scripts/train_wuerstchen_lora.py \
  --pretrained_prior_model_name_or_path "$ASSETS/wuerstchen-prior" \
  --pretrained_decoder_model_name_or_path "$ASSETS/wuerstchen" \
  --image_encoder_path "$ASSETS/effnet/effnet.safetensors" \
  --train_data_dir "$ASSETS/data" \
  --output_dir "$OUT/wuerstchen_lora" \
  --resolution 128 --random_flip --train_batch_size 4 --max_train_steps 40 \
  --learning_rate 1e-3 --checkpointing_steps 20 --validation_steps 20 --validation_inference_steps 4 \
  --validation_prompt "a green square on a white background" --num_validation_images 2 \
  --seed 0

echo "== Stable Cascade (Wuerstchen v3) stage C LoRA on the tiny Stable Cascade =="
"${LAUNCH[@]}" scripts/train_wuerstchen_lora.py \
  --pretrained_prior_model_name_or_path "$ASSETS/stable-cascade-prior" \
  --pretrained_decoder_model_name_or_path "$ASSETS/stable-cascade" \
  --image_encoder_path "$ASSETS/stable-cascade/effnet_encoder.safetensors" \
  --train_data_dir "$ASSETS/data" \
  --output_dir "$OUT/cascade_lora" \
  --resolution 128 --random_flip --train_batch_size 4 --max_train_steps 40 --train_text_encoder \
  --learning_rate 1e-3 --checkpointing_steps 20 --validation_steps 20 --validation_inference_steps 4 \
  --validation_prompt "a green square on a white background" --num_validation_images 2 \
  --seed 0

echo "== Generate with both checkpoints (and the base models, for comparison) =="
"$PY" scripts/infer.py --checkpoint "$OUT/sdxl_lokr/step40" --compare_base \
  --prompt "a red circle on a blue background" --prompt "a yellow triangle on a black background" \
  --num_images_per_prompt 2 --num_inference_steps 20 --output_dir "$OUT/samples/sdxl_lokr"
"$PY" scripts/infer.py --checkpoint "$OUT/wuerstchen_lora/step40" --compare_base \
  --prompt "a green square on a white background" --num_images_per_prompt 2 --num_inference_steps 4 \
  --output_dir "$OUT/samples/wuerstchen_lora"

echo "== Export the SDXL LoKr for ComfyUI / AUTOMATIC1111 =="
"$PY" scripts/export.py --checkpoint "$OUT/sdxl_lokr/step40" --format kohya --out "$OUT/export/sdxl_lokr.safetensors"

echo "== Export the Stable Cascade LoRA for ComfyUI =="
"$PY" scripts/export.py --checkpoint "$OUT/cascade_lora/step40" --format comfyui --out "$OUT/export/cascade_lora.safetensors"

echo
echo "checkpoints:       $(ls -d "$OUT"/*/step* | tr '\n' ' ')"
echo "validation images: $OUT/sdxl_lokr/validation $OUT/wuerstchen_lora/validation $OUT/cascade_lora/validation"
echo "model cards:       $OUT/sdxl_lokr/README.md $OUT/wuerstchen_lora/README.md $OUT/cascade_lora/README.md"
echo "samples (grids):   $OUT/samples/sdxl_lokr/grid.png $OUT/samples/wuerstchen_lora/grid.png"
echo "ComfyUI / A1111:   $OUT/export/sdxl_lokr.safetensors"
echo "ComfyUI (cascade): $OUT/export/cascade_lora.safetensors"
