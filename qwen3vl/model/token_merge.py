"""Vision-token merging between the tower and the LLM (`ModelConfig.vision_token_ratio`): ToMe-style bipartite
soft matching over spatial neighbours, within each frame (an image, or one temporal patch of a video).

A checkerboard splits a frame's grid of merged tokens into A ((row + col) even) and B (odd), so the four
neighbours of an A token are B tokens. Each A token finds its most similar B neighbour (cosine of the features);
the frame's m most similar A tokens merge into theirs (features averaged over each group, the DeepStack levels
with the same groups), the rest stay. m follows from the frame size and the ratio alone (`frame_tokens`), so
the host knows how many LLM tokens each frame takes; which tokens survive is decided on device.

Layout: the k-th survivor of a frame goes to row (frame start + k) of the merged-feature array (the frame start
of the unmerged layout), so the host can compute every token's row (`inputs.visual_rows`) and blocks from
several hosts keep their offsets. Positions: a survivor keeps its own grid position (a merged group takes its B
token's, the representative); the host writes each frame's origin at its token slots and the model adds the
survivor's (0, row, col).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_SCALE = 1000  # ratios are taken to 1/1000 so host (Python) and device (int32) counts agree exactly


def frame_tokens(n, ratio: float):
  """LLM tokens left of a frame of n merged tokens: ceil(ratio * n), but at least the B half (floor(n / 2)).
  Works on ints and int arrays alike (numpy or jax)."""
  q = int(round(ratio * _SCALE))
  if q >= _SCALE:
    return n
  keep = -(-n * q // _SCALE)
  if isinstance(n, (int, np.integer)):
    return int(max(keep, n // 2))
  return (np.maximum if isinstance(n, np.ndarray) else jnp.maximum)(keep, n // 2)


def merge_tokens(features, deepstack, segment_ids, rowcol, merge: int, ratio: float):
  """features [N, H] and deepstack [levels, N, H] of the tower's merged tokens, with the per-patch geometry
  (segment ids [4N], full-resolution (row, col) [4N, 2]) -> (features, deepstack, grid (row, col) [N, 2]) in
  the merged layout (see the module docstring; rows past a frame's survivors hold zeros)."""
  n = features.shape[0]
  seg = segment_ids[::merge * merge]
  rc = rowcol[::merge * merge] // merge  # a merge window's first patch: its (row, col) in merged units
  r, c = rc[:, 0], rc[:, 1]
  idx = jnp.arange(n)
  is_start = jnp.concatenate([jnp.ones((1,), bool), seg[1:] != seg[:-1]])
  start = jax.lax.cummax(jnp.where(is_start, idx, 0))  # first row of the token's frame
  run = jnp.cumsum(is_start) - 1
  size = jax.ops.segment_sum(jnp.ones_like(idx), run, num_segments=n)[run]
  width = jax.ops.segment_max(c, run, num_segments=n)[run] + 1
  real = seg > 0

  # Each A token's most similar B neighbour: left, right, up, down.
  neighbours = jnp.stack([idx - 1, idx + 1, idx - width, idx + width], -1)
  inside = jnp.clip(neighbours, 0, n - 1)
  ok = jnp.stack([c > 0, c < width - 1, r > 0, idx + width < start + size], -1) & real[:, None]
  f = features.astype(jnp.float32)
  f = f * jax.lax.rsqrt(jnp.maximum(jnp.sum(f * f, -1, keepdims=True), 1e-12))
  sim = jnp.where(ok, jnp.einsum("nh,nkh->nk", f, f[inside]), -jnp.inf)
  best = jnp.argmax(sim, -1)
  is_a = real & ((r + c) % 2 == 0) & ok.any(-1)
  score = jnp.where(is_a, jnp.max(sim, -1), -jnp.inf)

  # Per frame, the m best-scoring A tokens merge: rank A tokens within their frame by score.
  order = jnp.lexsort((-score, run))
  sorted_run = run[order]
  sorted_start = jax.lax.cummax(jnp.where(jnp.concatenate([jnp.ones((1,), bool), sorted_run[1:] != sorted_run[:-1]]),
                                          idx, 0))
  rank = jnp.zeros_like(idx).at[order].set(idx - sorted_start)
  m = jnp.where(real, size - frame_tokens(size, ratio), 0)
  merged = is_a & (rank < m)
  dst = jnp.where(merged, jnp.take_along_axis(inside, best[:, None], -1)[:, 0], idx)

  # Group averages at the destinations, then survivors to frame start + their rank among the frame's survivors.
  count = jnp.zeros((n,), jnp.float32).at[dst].add(1.0)
  survive = ~merged
  before = jnp.cumsum(survive) - survive
  target = jnp.where(survive, start + before - before[start], n)

  def regroup(x):  # [N, H] -> [N, H]
    summed = jnp.zeros(x.shape, jnp.float32).at[dst].add(x.astype(jnp.float32))
    mean = (summed / jnp.maximum(count, 1.0)[:, None]).astype(x.dtype)
    return jnp.zeros_like(x).at[target].set(mean, mode="drop")

  grid = jnp.zeros_like(rc).at[target].set(rc, mode="drop")
  return regroup(features), jax.vmap(regroup)(deepstack), grid
