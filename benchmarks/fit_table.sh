#!/usr/bin/env bash
# The README's fit table from the real compilers: each released size's train step compiled for 8 x H100 and a
# v5p-8 slice (FSDP 8, global batch 8 x 4096 tokens + 32768 image patches, remat full, default kernels).
# Usage: [TARGETS="h100:8 v5p:2x2x2"] bash benchmarks/fit_table.sh [OUT_LOG] [MODELS...]
# (needs jax[tpu] and the CUDA plugin; about 30 minutes on 2 cores)
set -u
cd "$(dirname "$0")/.." || exit 2
LOG="${1:-fit_table.log}"; shift || true
MODELS=("${@:-dense.py:2b dense.py:4b dense.py:8b moe.py:30b_a3b dense.py:32b moe.py:235b_a22b}")
for model in ${MODELS[@]}; do
  for target in ${TARGETS:-h100:8 v5p:2x2x2}; do
    echo "=== $model $target" >> "$LOG"
    JAX_PLATFORMS=cpu timeout 1800 python3 -m qwen3vl.tools.compile --config="configs/$model" --target="$target" \
      --config.mesh.data=1 --config.mesh.fsdp=8 --config.data.batch_size=8 --config.data.max_length=4096 \
      --config.data.max_patches=32768 --config.model.remat=full --config.model.vision_remat=full 2>/dev/null >> "$LOG"
    echo "exit $?" >> "$LOG"
  done
done
