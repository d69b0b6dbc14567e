#!/usr/bin/env bash
# The README's flow end to end on the CPU, on the tiny Flux-shaped model: `make demo` runs this.
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=${2:-demo_output}
BIN=$(dirname "$PY")

echo "== 0. tiny Flux-shaped pipeline and captioned images"
"$PY" -m flux_qlora.tiny --output_dir "$OUT"

echo "== 1. text embeddings"
"$PY" compute_embeddings.py --pretrained_model_name_or_path "$OUT/tiny-flux" \
  --instance_data_dir "$OUT/tiny-images" --output_path "$OUT/embeddings.parquet" \
  --validation_prompt "a red circle on a yellow background"

echo
echo "demo done: model $OUT/tiny-flux, images $OUT/tiny-images, embeddings $OUT/embeddings.parquet"
