#!/usr/bin/env bash
# The README's flow end to end on the CPU, on the tiny model of a family (flux1, flux2-klein, flux2-dev):
# `make demo [FAMILY=flux2-klein]` runs this.
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=${2:-demo_output}
FAMILY=${3:-flux1}
PROMPT="a red circle on a yellow background"
MODEL="$OUT/tiny-flux"
[ "$FAMILY" = flux1 ] || MODEL="$OUT/tiny-$FAMILY"

echo "== 0. tiny $FAMILY pipeline and captioned images"
"$PY" -m flux_qlora.tiny --output_dir "$OUT" --family "$FAMILY"

echo "== 1. text embeddings"
"$PY" compute_embeddings.py --pretrained_model_name_or_path "$MODEL" \
  --instance_data_dir "$OUT/tiny-images" --output_path "$OUT/embeddings.parquet" --validation_prompt "$PROMPT"

echo "== 2. QLoRA training (NF4 base, LoRA, 8-bit AdamW, checkpointing, cached latents)"
"$PY" -m accelerate.commands.launch -q --config_file accelerate.yaml train_qlora_flux.py \
  --pretrained_model_name_or_path "$MODEL" --instance_data_dir "$OUT/tiny-images" \
  --data_df_path "$OUT/embeddings.parquet" --output_dir "$OUT/lora" --width 64 --height 64 \
  --rank 16 --lora_layers all-linear --learning_rate 2e-3 --use_8bit_adam --gradient_checkpointing \
  --cache_latents --max_train_steps 120 --checkpointing_steps 40 --checkpoints_total_limit 2 \
  --validation_prompt "$PROMPT" --validation_steps 60 --report_to tensorboard --overwrite_output_dir

echo "== 3. inference with the LoRA, and fused + re-quantized to NF4"
rm -rf "$OUT/fused-transformer"  # --save_fused never overwrites: a rerun of the demo starts it afresh
"$PY" infer.py --pretrained_model_name_or_path "$MODEL" --lora "$OUT/lora" --prompt "$PROMPT" \
  --height 64 --width 64 --num_inference_steps 20 --output_dir "$OUT/images"
"$PY" infer.py --pretrained_model_name_or_path "$MODEL" --lora "$OUT/lora" --fuse \
  --save_fused "$OUT/fused-transformer" --quantize nf4 --prompt "$PROMPT" \
  --height 64 --width 64 --num_inference_steps 20 --output_dir "$OUT/images-fused-nf4"

echo
echo "demo done, all under $OUT/:"
echo "  model            $(basename "$MODEL")/            images  tiny-images/       embeddings  embeddings.parquet"
echo "  LoRA             lora/pytorch_lora_weights.safetensors (checkpoints in lora/checkpoint-*)"
echo "  loss curve       lora/loss.png         before/after samples  lora/samples/"
echo "  run summary      lora/train_summary.json   tensorboard  lora/logs/"
echo "  generated        images/ (LoRA loaded)  images-fused-nf4/ (fused, NF4)  fused-transformer/"
