"""Hardware overlays: fill the config fields left as None with what suits the platform.

`config.hardware` = auto (the default JAX backend) | cpu | gpu | tpu. Only fields still None are filled, so a
value given on the command line always wins. Peak FLOP/s by device kind feed the MFU estimate.
"""
from __future__ import annotations

import jax

# moe_impl: XLA:TPU lowers ragged_dot to a grouped-matmul kernel; XLA:CPU and XLA:GPU (jax 0.10.2) run it as every
# expert on every row, so they get the blocked experts (model/experts.py): one MoE layer of 235B-A22B on 8x8 H100
# (expert 8, capacity 1.25) holds 3.0 GiB of temporaries blocked against 16.1 expanded (README, expert
# parallelism). scan_layers: XLA:CPU copies each layer's weights and residuals in and out of the scan's stacked
# buffers (MoE step vs HF 0.89-0.93x scanned, 1.01x unrolled); accelerators keep the scan (compile time, one
# layer's program).
_ACCELERATOR = {"model.dtype": "bfloat16", "model.remat": "full", "model.vision_remat": "full",
                "model.scan_layers": True}  # attention: Pallas / Triton / cuDNN, then XLA
OVERLAYS = {
    "cpu": {"model.dtype": "float32", "model.attention_impl": "xla", "model.moe_impl": "blocked",
            "model.remat": "none", "model.vision_remat": "none", "model.scan_layers": False},
    "gpu": {**_ACCELERATOR, "model.moe_impl": "blocked"},
    "tpu": {**_ACCELERATOR, "model.moe_impl": "ragged"},
}

# Dense bf16 peak TFLOP/s per chip (vendor figures) for the MFU estimate.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5 lite": 197.0, "TPU v5": 459.0,
               "TPU v4": 275.0, "TPU v6 lite": 918.0}


def platform(config) -> str:
  name = config.hardware
  if name == "auto":
    name = jax.default_backend()
  if name not in OVERLAYS:
    raise ValueError(f"config.hardware must be auto, cpu, gpu or tpu; got {config.hardware!r}")
  return name


def apply_overlay(config) -> str:
  """Fills None fields of `config` in place; returns the platform name."""
  name = platform(config)
  with config.unlocked():
    for dotted, value in OVERLAYS[name].items():
      node = config
      *parents, leaf = dotted.split(".")
      for p in parents:
        node = node[p]
      if node.get(leaf) is None:
        node[leaf] = value
  return name


def peak_tflops(config) -> float | None:
  if config.train.peak_tflops:
    return float(config.train.peak_tflops)
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
