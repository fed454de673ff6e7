"""Frozen weights held in int8 or 4-bit NormalFloat (QLoRA's NF4), dequantized per layer as they are used.

Only a frozen base is quantized (LoRA fine-tuning, `ModelConfig.base_quant`): codes have no gradient. A weight
w [..., in, out] becomes codes of the same shape and float32 absmax scales [..., in / block, out]: one scale per
output column and block of `block` input rows (int8: the whole column; nf4: 64 rows, as bitsandbytes). Scales keep
the weight's rank and logical axes, so the sharding rules place them like the weight. Codes are `int8` / `uint4`
(XLA packs two uint4 in a byte on TPU and GPU; XLA:CPU keeps a byte each). Dequantizing inside the layer (under
the scan over layers) keeps one layer's weights in the compute dtype at a time.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

KINDS = ("int8", "nf4")
NF4_BLOCK = 64

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (Dettmers et al. 2023, as in
# bitsandbytes).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def block_size(kind: str, d_in: int) -> int:
  """Input rows per scale: the column for int8; 64 for nf4 (the whole column when d_in is not a multiple)."""
  if kind not in KINDS:
    raise ValueError(f"unknown base quantization {kind!r}; choose one of {KINDS}")
  return NF4_BLOCK if kind == "nf4" and d_in % NF4_BLOCK == 0 else d_in


def code_dtype(kind: str):
  return jnp.int8 if kind == "int8" else jnp.uint4


def scale_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  *lead, d_in, d_out = shape
  return (*lead, d_in // block_size(kind, d_in), d_out)


def quantize(w, kind: str):
  """w [..., in, out] (numpy or jax) -> (codes, float32 scales); numpy in, numpy out (host-side conversion)."""
  xp = np if isinstance(w, np.ndarray) else jnp
  *lead, d_in, d_out = w.shape
  b = block_size(kind, d_in)
  blocks = w.astype(xp.float32).reshape(*lead, d_in // b, b, d_out)
  scale = xp.maximum(xp.abs(blocks).max(axis=-2), 1e-12)  # [..., in / b, out]
  unit = blocks / scale[..., None, :]
  if kind == "int8":
    codes = xp.clip(xp.round(unit * 127), -127, 127).astype(xp.int8)
  else:  # nearest NF4 level (the levels are sorted: compare with the midpoints)
    mids = (NF4[1:] + NF4[:-1]) / 2
    codes = (unit[..., None] > xp.asarray(mids)).sum(-1).astype(code_dtype("nf4"))
  return codes.reshape(w.shape), scale


def dequantize(codes, scale, dtype):
  """codes [..., in, out], scales [..., in / b, out] -> the weight in `dtype`."""
  *lead, d_in, d_out = codes.shape
  b = d_in // scale.shape[-2]
  if codes.dtype == jnp.int8:
    unit = codes.astype(jnp.float32) / 127
  else:
    unit = jnp.asarray(NF4)[codes.astype(jnp.int32)]
  w = unit.reshape(*lead, d_in // b, b, d_out) * scale[..., None, :].astype(jnp.float32)
  return w.reshape(codes.shape).astype(dtype)
