"""Rotary embeddings: interleaved 3-D MRoPE for the text decoder, axial 2-D RoPE for the vision tower.

Both use the half-split ("NeoX") pairing: dim j rotates with dim j + head_dim/2. Angles are float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mrope_axis_map(head_dim: int, mrope_section) -> np.ndarray:
  """Which position row (0 = t, 1 = h, 2 = w) drives each of the head_dim/2 frequencies.

  Qwen3-VL interleaves: j % 3 == 1 -> h (while j < 3*s_h), j % 3 == 2 -> w (while j < 3*s_w), else t,
  giving T H W T H W ... T T T T. (Qwen2/2.5-VL used contiguous chunks instead; that is wrong here.)
  """
  j = np.arange(head_dim // 2)
  axis = np.zeros_like(j)
  axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
  axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
  return axis


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float, mrope_section, dtype):
  """positions [3, B, L] int -> (cos, sin) [B, L, head_dim] in `dtype`."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  axis = mrope_axis_map(head_dim, mrope_section)
  pos = positions.astype(jnp.float32)[axis]  # [head_dim/2, B, L]: the row each frequency reads
  angle = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([angle, angle], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def vision_cos_sin(rowcol: jax.Array, head_dim: int, theta: float):
  """rowcol [N, 2] int (full-resolution patch row, col) -> float32 (cos, sin) [N, head_dim].

  Layout: [row freqs (hd/4), col freqs (hd/4)] repeated twice, as HF's axial vision RoPE.
  """
  spatial = head_dim // 2
  inv_freq = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
  angle = rowcol.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [N, 2, hd/4]
  angle = angle.reshape(*angle.shape[:-2], -1)
  emb = jnp.concatenate([angle, angle], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [..., L, heads, head_dim]; cos/sin [..., L, head_dim] broadcast over heads."""
  cos, sin = cos[..., None, :], sin[..., None, :]
  return x * cos + rotate_half(x) * sin
