"""Block-sparse layouts: builders (static, per-segment, dynamic top-k), validation, layout -> index lists.

The attention entry points that take them are in ``kernels.block_sparse``; this module sits below every
implementation (they import it, it imports none of them).

A *layout* is a bool array over blocks of ``block_size`` tokens, [nq_blocks, nk_blocks] (shared by all heads) or
[Hq, nq_blocks, nk_blocks] (one per query head), with nq_blocks = ceil(Lq / block_size) and nk_blocks =
ceil(Lk / block_size); the last block of either side may be partial. Query block i holds query *indices*
[i * bs, (i + 1) * bs) and key block j key indices [j * bs, (j + 1) * bs). Only marked blocks are computed; inside a
marked block the token-level masks of ``kernels.attention`` still apply (length padding, causal, sliding window,
segment ids), so the result is exactly dense attention under ``expand(layout) & token_masks``, and a query that sees
no key outputs 0. Under causal with Lq != Lk the queries are the last Lq positions, as in ``kernels.attention``.

Design choices:

* Layouts are dense bool matrices, not index lists, because that is what builders naturally produce, what combines
  with ``&`` / ``|``, and what the Pallas contract takes. Implementations turn them into per-query-block lists of
  key-block indices with ``layout_to_lists`` (padded to the longest row, plus a count), so their cost follows the
  number of marked blocks rather than nq * nk.
* Static builders (``causal_layout``, ``sliding_window_layout``) return numpy arrays: a concrete layout gives
  concrete lists, so the XLA implementation sizes its loop by the exact longest row at trace time, and Pallas
  backends can treat the layout as compile-time metadata. Data-dependent builders (``segment_layout``,
  ``dynamic_topk_layout``) return jax arrays; inside ``jit`` they are traced, the lists are padded to nk and the XLA
  loop runs for the longest row's count, read at run time (a while loop), so cost still follows density.
* ``dynamic_topk_layout`` scores key blocks by the dot product of block means (mean over the block's tokens, and
  over the batch), which equals the mean q.k score over the block pair: a cheap O((Lq + Lk) d + nq nk d) proxy.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def num_blocks(length: int, block_size: int) -> int:
  """Blocks needed for ``length`` tokens (the last may be partial)."""
  return -(-int(length) // int(block_size))


def concrete_or_none(x) -> Optional[np.ndarray]:
  """``x`` as a numpy array when its value is known at trace time, else None (a tracer inside jit)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


# ----------------------------------------------------------------------------- layout -> index lists

def layout_to_lists(layout, max_count: Optional[int] = None):
  """Per query block, the marked key blocks as an index list: (indices [..., nq, C] int32, counts [..., nq] int32).

  ``indices[..., i, :counts[..., i]]`` are the marked key blocks of row i in ascending order; the remaining slots
  repeat the row's last marked block (0 for an empty row), so a gather there stays in bounds and in cache — callers
  mask slots >= count. C is ``max_count`` if given (at most nk), else the longest row (at least 1) when ``layout``
  is concrete, else nk. A concrete layout gives numpy arrays (usable as static metadata, e.g. Pallas scalar
  prefetch); a traced one gives jax arrays. A row with more than C marked blocks raises for a concrete layout and is
  truncated (count clipped to C, lowest indices kept) for a traced one.
  """
  concrete = concrete_or_none(layout)
  xp = np if concrete is not None else jnp
  lay = concrete.astype(bool) if concrete is not None else jnp.asarray(layout).astype(bool)
  nk = lay.shape[-1]
  counts = lay.sum(-1).astype(xp.int32)
  if max_count is not None:
    width = min(int(max_count), nk)
    if concrete is not None and counts.size and int(counts.max()) > width:
      raise ValueError(f"layout has a row with {int(counts.max())} marked blocks; max_count={max_count}")
  elif concrete is not None:
    width = max(int(counts.max()) if counts.size else 0, 1)
  else:
    width = nk
  j = xp.arange(nk, dtype=xp.int32)
  key = xp.where(lay, j, nk + j)  # marked blocks first, each group ascending
  order = xp.argsort(key, axis=-1)[..., :width].astype(xp.int32)
  counts = xp.minimum(counts, width)
  last = xp.take_along_axis(order, xp.maximum(counts - 1, 0)[..., None], axis=-1)
  slot = xp.arange(width, dtype=xp.int32)
  indices = xp.where(slot < counts[..., None], order, xp.where(counts[..., None] > 0, last, 0))
  return indices.astype(xp.int32), counts.astype(xp.int32)


# ----------------------------------------------------------------------------- static builders

def _block_positions(nq, nk, block_size, q_len, kv_len):
  """(last query position of each q block [nq], first key position of each k block [nk]) in shared units.

  Without lengths, one block is one unit and the q blocks are the last nq of the nk (bottom-right aligned).
  """
  if block_size is None or q_len is None or kv_len is None:
    if not (block_size is None and q_len is None and kv_len is None):
      raise ValueError("give all of block_size, q_len and kv_len, or none of them")
    return np.arange(nq) + (nk - nq), np.arange(nk)
  if (num_blocks(q_len, block_size), num_blocks(kv_len, block_size)) != (nq, nk):
    raise ValueError(f"q_len={q_len}, kv_len={kv_len} at block_size={block_size} do not give {nq}x{nk} blocks")
  i, j = np.arange(nq), np.arange(nk)
  return (kv_len - q_len) + np.minimum((i + 1) * block_size, q_len) - 1, j * block_size


def causal_layout(nq: int, nk: int, *, block_size: Optional[int] = None, q_len: Optional[int] = None,
                  kv_len: Optional[int] = None) -> np.ndarray:
  """[nq, nk] bool: key block j is marked for query block i if it holds any key at or before the block's last query.

  Without lengths the query blocks are the last nq key blocks (exact when Lk - Lq is a multiple of the block size,
  e.g. Lq == Lk); give ``block_size``, ``q_len`` and ``kv_len`` for the exact layout of any lengths (decode).
  """
  q_last, k_first = _block_positions(nq, nk, block_size, q_len, kv_len)
  return k_first[None, :] <= q_last[:, None]


def sliding_window_layout(nq: int, nk: int, window_blocks: int, *, causal: bool = True) -> np.ndarray:
  """[nq, nk] bool band: the diagonal key block and the ``window_blocks - 1`` before it (bottom-right aligned).

  To cover a token window w (query p sees keys p - w < j <= p) with Lq == Lk, use window_blocks =
  ceil((w - 1) / block_size) + 1. ``causal=False`` also marks every block after the diagonal (the one-sided window
  of ``kernels.attention`` without causal).
  """
  if int(window_blocks) <= 0:
    raise ValueError(f"window_blocks must be a positive int, got {window_blocks}")
  d = (np.arange(nq)[:, None] + (nk - nq)) - np.arange(nk)[None, :]  # diagonal distance, >0 for past blocks
  return (d < window_blocks) & ((d >= 0) | (not causal))


# ----------------------------------------------------------------------------- data-dependent builders

def segment_layout(q_segment_ids, kv_segment_ids, block_size: int):
  """[B, nq, nk] bool: block pair (i, j) is marked iff some query of block i and key of block j share an id.

  Exact for any ids (packed images give a block diagonal). The layout has a batch axis while
  ``block_sparse_attention`` takes one layout for the whole batch: pass ``layout[b]`` for a single element or
  ``layout.any(0)`` for all, together with the same ``segment_ids`` (the layout only skips blocks; the ids mask the
  tokens inside blocks that two segments share, unless every boundary falls on a block boundary).
  """
  q_ids, kv_ids = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
  if q_ids.ndim != 2 or kv_ids.ndim != 2 or q_ids.shape[0] != kv_ids.shape[0]:
    raise ValueError(f"segment ids must be [batch, length] with one batch; got {q_ids.shape}, {kv_ids.shape}")
  bs = int(block_size)
  nq, nk = num_blocks(q_ids.shape[1], bs), num_blocks(kv_ids.shape[1], bs)
  # Edge padding repeats a real id of the last block, so its set of ids is unchanged.
  q_ids = jnp.pad(q_ids, ((0, 0), (0, nq * bs - q_ids.shape[1])), mode="edge")
  kv_sorted = jnp.sort(jnp.pad(kv_ids, ((0, 0), (0, nk * bs - kv_ids.shape[1])), mode="edge").reshape(-1, nk, bs), -1)

  def in_block(sorted_ids, ids):  # [bs], [Lq_pad] -> [Lq_pad]: is each id among the block's ids
    at = jnp.minimum(jnp.searchsorted(sorted_ids, ids), bs - 1)
    return sorted_ids[at] == ids

  found = jax.vmap(jax.vmap(in_block, (0, None), 1))(kv_sorted, q_ids)  # [B, Lq_pad, nk]
  return found.reshape(found.shape[0], nq, bs, nk).any(2)


def _pool(x, block_size):
  """Mean over each block's real tokens: [B, L, H, D] -> [B, n_blocks, H, D] float32."""
  b, length, h, d = x.shape
  n = num_blocks(length, block_size)
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * block_size - length), (0, 0), (0, 0)))
  sizes = np.minimum(block_size, length - np.arange(n) * block_size).astype(np.float32)
  return x.reshape(b, n, block_size, h, d).sum(2) / sizes[None, :, None, None]


def dynamic_topk_layout(q, k, block_size: int, top_k: int, *, local_blocks: int = 1, causal: bool = False):
  """[Hq, nq, nk] bool: per query block and head, the local blocks plus the top_k best-scoring other key blocks.

  Score of (i, j) for head h: mean over the batch of pooled_q[i, h] . pooled_k[j, kv head of h], the block means
  (see module docstring). Local blocks are the diagonal key block (holding the block's last query position, with
  queries the last Lq of Lk positions) and the ``local_blocks - 1`` before it; they are always kept. Under causal
  only key blocks up to the diagonal are eligible, so future blocks are never selected. Each row marks
  min(top_k + local, eligible) blocks. Runs under jit (``jax.lax.top_k``, static ``top_k``); no gradient flows
  through the selection. Feed it to ``block_sparse_attention`` with the same ``causal``, which also masks the
  future keys inside the diagonal block.
  """
  bs, top_k, local_blocks = int(block_size), int(top_k), int(local_blocks)
  if bs <= 0 or top_k < 0 or local_blocks < 0:
    raise ValueError(f"need block_size > 0, top_k >= 0, local_blocks >= 0; got {bs}, {top_k}, {local_blocks}")
  (b, lq, hq, _), (lk, hkv) = q.shape, k.shape[1:3]
  nq, nk = num_blocks(lq, bs), num_blocks(lk, bs)
  qp = _pool(lax.stop_gradient(q), bs)  # [B, nq, Hq, D]
  kp = jnp.repeat(_pool(lax.stop_gradient(k), bs), hq // hkv, axis=2)  # [B, nk, Hq, D]
  scores = jnp.einsum("bihd,bjhd->hij", qp, kp, precision=lax.Precision.HIGHEST) / b
  diag = ((lk - lq) + np.minimum((np.arange(nq) + 1) * bs, lq) - 1) // bs  # [nq]; < 0 if no key is visible
  j = np.arange(nk)
  local = (j[None, :] <= diag[:, None]) & (j[None, :] > diag[:, None] - local_blocks)  # [nq, nk]
  eligible = (j[None, :] <= diag[:, None]) if causal else np.ones((nq, nk), bool)
  layout = jnp.broadcast_to(jnp.asarray(local), (hq, nq, nk))
  kk = min(top_k, nk)
  if kk == 0:
    return layout
  cand = jnp.where(jnp.asarray(eligible & ~local), scores, -jnp.inf)
  vals, idx = lax.top_k(cand, kk)  # [Hq, nq, kk]
  picked = ((idx[..., None] == j) & (vals > -jnp.inf)[..., None]).any(-2)
  return layout | picked


# ----------------------------------------------------------------------------- validation

def check_layout(block_layout, q, k, block_size):
  """Validates a layout against q / k; returns it as bool ([nq, nk] or [Hq, nq, nk]), numpy when concrete."""
  if not isinstance(block_size, (int, np.integer)) or block_size <= 0:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  lq, hq, lk = q.shape[1], q.shape[2], k.shape[1]
  nq, nk = num_blocks(lq, block_size), num_blocks(lk, block_size)
  concrete = concrete_or_none(block_layout)
  layout = concrete.astype(bool) if concrete is not None else jnp.asarray(block_layout).astype(bool)
  if layout.ndim == 3 and layout.shape[0] == 1:
    layout = layout[0]
  if layout.shape[-2:] != (nq, nk) or layout.ndim not in (2, 3) or (layout.ndim == 3 and layout.shape[0] != hq):
    raise ValueError(f"block_layout shape {tuple(layout.shape)} must be ({nq}, {nk}) or ({hq}, {nq}, {nk}) for "
                     f"Lq={lq}, Lk={lk}, Hq={hq} at block_size={block_size}")
  return layout
