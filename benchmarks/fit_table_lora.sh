#!/usr/bin/env bash
# The README's one-chip LoRA fit table from the real compilers: LoRA train steps (rank 16 on every decoder
# projection, base frozen in bfloat16, or nf4 for QLoRA) compiled for single-chip targets, batch 1 x 2048 tokens +
# 4096 image patches (one 1024 x 1024 image), remat full, default kernels.
# Usage: [TARGETS="v5e:1 l4:1"] bash benchmarks/fit_table_lora.sh [OUT_LOG] [MODEL:BASE ...]
# (needs jax[tpu] and the CUDA plugin; about 2 minutes a compile on 2 cores)
set -u
cd "$(dirname "$0")/.." || exit 2
LOG="${1:-fit_table_lora.log}"; shift || true
RUNS=("${@:-dense.py:2b:bfloat16 dense.py:4b:bfloat16 dense.py:8b:nf4 dense.py:8b:bfloat16}")
for run in ${RUNS[@]}; do
  model="${run%:*}"; base="${run##*:}"
  for target in ${TARGETS:-v5e:1 v6e:1x1 l4:1 a100_40gb:1}; do
    echo "=== $model $base $target" >> "$LOG"
    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 timeout 1800 python3 -m qwen3vl.tools.compile \
      --config="configs/$model" --target="$target" --config.lora.rank=16 --config.lora.base="$base" \
      --config.data.batch_size=1 --config.data.max_length=2048 --config.data.max_patches=4096 \
      --config.model.remat=full --config.model.vision_remat=full 2>/dev/null >> "$LOG"
    echo "exit $?" >> "$LOG"
  done
done
