"""Skip tables of the Pallas TPU flash kernels (``kernels.pallas_tpu_attention``): which kv blocks each query block
visits, as flat int32 lists the kernels scalar-prefetch into SMEM, and how many query blocks one call may take so
the tables fit there. A table row is one (batch, head, q block); the kernel module's docstring has the design.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SMEM_TABLE_BYTES = 256 * 1024  # per kernel call, of the 1 MiB SMEM (TPU v5e, v6e)


def static_visibility(causal, window, bq, bk, lq, lk, nq, nk):
  """[nq, nk] bool: can block (i, j) hold a visible (query, key) pair? Exact for causal/window/padding.

  Query row r (< lq) sits at position r + lk - lq. A q block spans positions [qlo, qhi], a kv block keys
  [klo, khi]; causal needs klo <= qhi, the window (q - k < w) needs khi > qlo - w.
  """
  off = lk - lq
  qlo = np.arange(nq) * bq + off
  qhi = np.minimum(np.arange(1, nq + 1) * bq, lq) - 1 + off
  klo = np.arange(nk) * bk
  khi = np.minimum(np.arange(1, nk + 1) * bk, lk) - 1
  vis = np.ones((nq, nk), bool)
  if causal:
    vis &= klo[None, :] <= qhi[:, None]
  if window is not None:
    vis &= khi[None, :] > qlo[:, None] - window
  return vis


def segment_visibility(cfg, segs):
  """[B, nq, nk] bool from per-block min/max segment ids (padding positions excluded): overlap => may see."""
  big = jnp.iinfo(jnp.int32).max

  def ranges(ids, length, padded, block):
    ids = jnp.pad(ids, ((0, 0), (0, padded - length)))
    valid = jnp.arange(padded) < length
    lo = jnp.where(valid, ids, big).reshape(ids.shape[0], -1, block).min(-1)
    hi = jnp.where(valid, ids, -big).reshape(ids.shape[0], -1, block).max(-1)
    return lo, hi

  qlo, qhi = ranges(segs[0], cfg.lq, cfg.lq_pad, cfg.bq)
  klo, khi = ranges(segs[1], cfg.lk, cfg.lk_pad, cfg.bk)
  return (qlo[:, :, None] <= khi[:, None, :]) & (klo[:, None, :] <= qhi[:, :, None])


def lists(vis, steps):
  """vis [..., n] bool -> (idx [..., steps] int32, count [...] int32): visible indices first, in order.

  Entries past the count repeat the last visible index (0 when none), so the pipeline re-uses the block it
  already holds instead of fetching one that the kernel would skip anyway.
  """
  n = vis.shape[-1]
  count = vis.sum(-1).astype(jnp.int32)
  order = jnp.argsort(~vis, axis=-1, stable=True).astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  idx = jnp.where(jnp.arange(n) < count[..., None], order, last)
  return idx[..., :steps], count


def tables(cfg, segs, vis, layout_dyn):
  """Flattened (1-D, SMEM-friendly) forward lists [Bt, Ht, nq, ...] and transposed dk/dv lists."""
  v = jnp.asarray(vis)[None]  # [1, Ht, nq, nk]
  if layout_dyn is not None:
    v = v & (layout_dyn if layout_dyn.ndim == 3 else layout_dyn[None])[None]
  if segs is not None:
    v = v & segment_visibility(cfg, segs)[:, None]
  v = jnp.broadcast_to(v, (cfg.bt, cfg.ht) + v.shape[2:])
  fidx, fcnt = lists(v, cfg.fwd_steps)
  bidx, bcnt = lists(jnp.swapaxes(v, -1, -2), cfg.bwd_steps)
  return tuple(x.reshape(-1) for x in (fidx, fcnt, bidx, bcnt))


def row(cfg, b, h, i, n_rows):
  """Flat index of list (b, h, i) in a table [Bt, Ht, n_rows]; tables broadcast over b / h when Bt / Ht = 1."""
  bsel = b if cfg.bt > 1 else 0
  hsel = h if cfg.ht > 1 else 0
  return (bsel * cfg.ht + hsel) * n_rows + i


def blocks_per_call(lists: int, nq: int, nk: int, fwd_steps: int, bwd_steps: int) -> int:
  """Query blocks one kernel call may take so each call's scalar-prefetched skip tables fit SMEM_TABLE_BYTES.

  The tables are int32 [lists, nq, fwd_steps] (+ counts) and [lists, nk, bwd_steps]: a long packed sequence (the
  vision tower's 32k patches a chip: 256 x 2048 blocks, 2 MiB) overflows the 1 MiB of SMEM, so such a call is
  split along its query rows (both tables shrink with the rows a call takes).
  """
  def table_bytes(rows, f_steps, b_steps):
    return 4 * lists * max(rows * (f_steps + 1), nk * (b_steps + 1))

  if table_bytes(nq, fwd_steps, bwd_steps) <= SMEM_TABLE_BYTES:
    return nq
  rows = nq
  while rows > 1 and table_bytes(rows, min(fwd_steps, nk), min(bwd_steps, rows)) > SMEM_TABLE_BYTES:
    rows = -(-rows // 2)
  if table_bytes(rows, min(fwd_steps, nk), min(bwd_steps, rows)) > SMEM_TABLE_BYTES:
    raise NotImplementedError(f"Pallas TPU attention: skip tables for {nk} kv blocks x {lists} lists exceed "
                              f"{SMEM_TABLE_BYTES} bytes of SMEM even one query block per call")
  return rows
