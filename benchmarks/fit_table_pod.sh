#!/usr/bin/env bash
# Issue 19's pod-scale tables from the real compilers (README "Expert parallelism at pod scale").
#  1. The MoE layer alone (--step=moe_layer: forward + backward), per-device temporaries of the all_to_all dispatch
#     (dropless, and capacity factor 1.25) against all_gather, same mesh and batch (1 x 4096 tokens a device), at
#     expert 8 (fsdp 8 x expert 8) and expert 64, on h100:8x8 and v5p:4x4x4; ragged_dot experts (the TPU overlay's),
#     and the blocked ones (the GPU overlay's: XLA:GPU expands ragged_dot to every local expert, jax 0.10.2).
#  2. The whole train step of 30B-A3B and 235B-A22B on 64 chips (fsdp 8 x expert 8, remat full), what fits where.
# Usage: bash benchmarks/fit_table_pod.sh [OUT_LOG] [layer|train|all]   (needs jax[tpu] and the CUDA plugin)
set -u
cd "$(dirname "$0")/.." || exit 2
LOG="${1:-fit_table_pod.log}"; WHAT="${2:-all}"
export JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1
BATCH=(--config.mesh.data=1 --config.data.batch_size=64 --config.data.max_length=4096 --config.data.max_patches=65536
       --config.model.remat=full --config.model.vision_remat=full)
compile() {  # model target label flags...
  local model=$1 target=$2 label=$3; shift 3
  echo "=== $model $target $label" >> "$LOG"
  timeout 1800 python3 -m qwen3vl.tools.compile --config="configs/moe.py:$model" --target="$target" "${BATCH[@]}" \
    "$@" 2>/dev/null >> "$LOG"
  echo "exit $?" >> "$LOG"
}
if [[ $WHAT == layer || $WHAT == all ]]; then
  for model in 235b_a22b 30b_a3b; do
    for target in h100:8x8 v5p:4x4x4; do
      for mesh in "--config.mesh.fsdp=8 --config.mesh.expert=8" "--config.mesh.fsdp=1 --config.mesh.expert=64"; do
        for dispatch in "all_gather" "all_to_all" "all_to_all --config.model.moe_capacity_factor=1.25" \
                        "all_to_all --config.model.moe_capacity_factor=1.25 --config.model.moe_impl=blocked"; do
          # shellcheck disable=SC2086
          compile $model $target "moe_layer $mesh $dispatch" --step=moe_layer $mesh --config.model.moe_impl=ragged \
            --config.model.moe_dispatch=$dispatch
        done
      done
    done
  done
fi
if [[ $WHAT == train || $WHAT == all ]]; then
  for model in 30b_a3b 235b_a22b; do
    for target in v5p:4x4x4 h100:8x8; do
      compile $model $target "train fsdp 8 x expert 8" --config.mesh.fsdp=8 --config.mesh.expert=8
    done
  done
  compile 235b_a22b h100:8x8 "train fsdp 8 x expert 8, optimizer on host" --config.mesh.fsdp=8 \
    --config.mesh.expert=8 --config.offload.optimizer_state=True
  compile 235b_a22b v5p:4x4x4 "train expert 64, capacity 1.25" --config.mesh.fsdp=1 --config.mesh.expert=64 \
    --config.model.moe_capacity_factor=1.25
fi
