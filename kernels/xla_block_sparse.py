"""Block-sparse attention in plain JAX whose cost follows the layout's density: the reference for block-sparse kernels.

How: the layout becomes, per query block (and per query head for per-head layouts), a list of marked key-block
indices padded to the longest row plus a count (``kernels.layouts.layout_to_lists``). Query blocks are taken in
chunks of about ``q_tokens_per_step`` tokens (2048: with 128-token blocks one step's scores are as large as one
512 x 512 tile of ``xla_attention``). Within a chunk a loop over list *slots* gathers, for every query block of the
chunk at once, the key/value block named in that slot, computes its [bs, bs] scores and folds them into an online
softmax (running max, sum and accumulator, float32). Work is slots * nq * bs * bs per head instead of
nq * nk * bs * bs, so time falls with density. Slots past a row's count are masked; the loop runs for the chunk's
longest row, so chunking also saves most of the padding of uneven layouts (causal: row i has i + 1 blocks).

Loop length: with one chunk and a concrete layout it is static (the exact longest row: a scan XLA can see through);
otherwise (several chunks, or a layout traced inside jit such as dynamic top-k, whose lists are padded to nk) it is
the chunk's max count read at run time, a while loop, so cost still follows density.

Backward: a ``jax.custom_vjp`` that recomputes the probabilities from the saved log-sum-exp in one more pass over
the chunks and slots: dq accumulates per query block, dk / dv are scatter-added into the key blocks each slot
gathered (duplicates across query blocks add up). Memory is O(L) plus one slot's scores, never a saved carry per
slot. Per-head layouts with GQA gather one key block per query head (the heads of a group may choose different
blocks); a shared layout gathers per kv head and never repeats k / v.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qwen3vl.kernels.layouts import check_layout, layout_to_lists

F32 = jnp.float32
NEG_INF = -jnp.inf


class _Cfg(NamedTuple):
  """Static settings; lengths are the unpadded ones. ``steps``: static slot-loop length, None = read at run time."""
  causal: bool
  window: Optional[int]
  scale: float
  bs: int
  lq: int
  lk: int
  per_head: bool
  qc: int  # query blocks per chunk
  steps: Optional[int]


def xla_block_sparse_attention(q, k, v, *, block_layout, block_size, causal=False, segment_ids=None,
                               sliding_window=None, scale=None, q_tokens_per_step=2048):
  """Block-sparse attention over [batch, length, heads, head_dim]; see ``kernels.block_sparse_attention``.

  ``segment_ids`` is None, one [B, L] array (Lq == Lk) or a (q_ids, kv_ids) pair; ``block_layout`` is bool
  [nq, nk] or [Hq, nq, nk] (concrete or traced); ``sliding_window``, ``scale``, ``block_size`` and
  ``q_tokens_per_step`` (query tokens per chunk, bounds the scores held at once) are static.
  """
  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  layout = check_layout(block_layout, q, k, block_size)
  idx, counts = layout_to_lists(layout)
  per_head = layout.ndim == 3 and hq > 1
  nq, bs = layout.shape[-2], int(block_size)
  qc = min(nq, max(1, int(q_tokens_per_step) // bs))
  static = isinstance(idx, np.ndarray) and qc == nq
  if per_head:  # [Hq, nq, C] -> [Hkv, G, nq, C], query head h = kv head h // G, member h % G
    idx = idx.reshape(hkv, hq // hkv, *idx.shape[1:])
    counts = counts.reshape(hkv, hq // hkv, -1)
  else:
    idx, counts = idx.reshape(1, 1, *idx.shape[-2:]), counts.reshape(1, 1, -1)
  cfg = _Cfg(bool(causal), None if sliding_window is None else int(sliding_window),
             float(d ** -0.5 if scale is None else scale), bs, lq, k.shape[1], per_head, qc,
             idx.shape[-1] if static else None)
  if segment_ids is not None:
    pair = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
    segment_ids = tuple(jnp.asarray(s, jnp.int32) for s in pair)
  return _sparse(cfg, q, k, v, segment_ids, jnp.asarray(idx, jnp.int32), jnp.asarray(counts, jnp.int32))


# ----------------------------------------------------------------------------- blocking, gathering, masking

def _pad_axis1(x, multiple):
  return jnp.pad(x, [(0, 0), (0, -x.shape[1] % multiple)] + [(0, 0)] * (x.ndim - 2))


def _q_chunks(x, cfg, hkv):
  """[B, Lq, Hq, D] -> [n_chunks, B, Hkv, G, qc, bs, D] (zero padding)."""
  x = _pad_axis1(x, cfg.bs * cfg.qc)
  b, lp, hq, d = x.shape
  x = x.reshape(b, lp // (cfg.bs * cfg.qc), cfg.qc, cfg.bs, hkv, hq // hkv, d)
  return x.transpose(1, 0, 4, 5, 2, 3, 6)


def _q_unchunks(x, cfg):
  """Inverse of ``_q_chunks``."""
  nc, b, hkv, g, qc, bs, d = x.shape
  return x.transpose(1, 0, 4, 5, 2, 3, 6).reshape(b, nc * qc * bs, hkv * g, d)[:, :cfg.lq]


def _kv_blocks(x, cfg):
  """[B, Lk, Hkv, D] -> [B, Hkv, nk, bs, D]."""
  x = _pad_axis1(x, cfg.bs)
  b, lp, h, d = x.shape
  return x.reshape(b, lp // cfg.bs, cfg.bs, h, d).transpose(0, 3, 1, 2, 4)


def _kv_unblocks(x, cfg):
  b, h, nk, bs, d = x.shape
  return x.transpose(0, 2, 3, 1, 4).reshape(b, nk * bs, h, d)[:, :cfg.lk]


def _list_chunks(cfg, idx, counts):
  """Index lists [h, g, nq, C] / counts [h, g, nq] -> [n_chunks, h, g, qc, C] / [n_chunks, h, g, qc] (padded rows
  have count 0), plus each chunk's global query-block numbers [n_chunks, qc]."""
  nq = counts.shape[-1]
  nc = -(-nq // cfg.qc)
  pad = nc * cfg.qc - nq
  idx = jnp.pad(idx, ((0, 0), (0, 0), (0, pad), (0, 0)))
  counts = jnp.pad(counts, ((0, 0), (0, 0), (0, pad)))
  idx = jnp.moveaxis(idx.reshape(*idx.shape[:2], nc, cfg.qc, idx.shape[-1]), 2, 0)
  counts = jnp.moveaxis(counts.reshape(*counts.shape[:2], nc, cfg.qc), 2, 0)
  return idx, counts, jnp.arange(nc * cfg.qc).reshape(nc, cfg.qc)


def _kspec(cfg):
  """einsum letters of a gathered key block: per head [B, Hkv, G, qc, bk, D], shared [B, Hkv, qc, bk, D]."""
  return "bhgnkd" if cfg.per_head else "bhnkd"


def _gather(cfg, x, j):
  """The key blocks named by j ([Hkv|1, G|1, qc]) from x [B, Hkv, nk, bs, D]."""
  if cfg.per_head:
    return x[:, jnp.arange(x.shape[1])[:, None, None], j]  # [B, Hkv, G, qc, bs, D]
  return jnp.take(x, j[0, 0], axis=2)  # [B, Hkv, qc, bs, D]


def _scatter_add(cfg, acc, j, update):
  """acc[blocks j] += update (inverse of ``_gather``; duplicate blocks accumulate)."""
  if cfg.per_head:
    return acc.at[:, jnp.arange(acc.shape[1])[:, None, None], j].add(update)
  return acc.at[:, :, j[0, 0]].add(update)


def _mask(cfg, j, live, qblk, segs):
  """Visibility broadcastable to [B, Hkv, G, qc, bq, bk]: live slot, kv padding, causal, window, segments."""
  kp = (j[..., None] * cfg.bs + jnp.arange(cfg.bs))[..., None, :]  # [h, g, qc, 1, bk]
  qpos = (qblk[:, None] * cfg.bs + jnp.arange(cfg.bs) + (cfg.lk - cfg.lq))[:, :, None]  # [qc, bq, 1]
  mask = (kp < cfg.lk) & live[..., None, None]
  if cfg.causal:
    mask = mask & (kp <= qpos)
  if cfg.window is not None:
    mask = mask & (qpos - kp < cfg.window)
  mask = mask[None]
  if segs is not None:
    qseg, kvseg = segs  # [B, qc, bq] (this chunk), [B, nk, bk]
    kseg = kvseg[:, j] if cfg.per_head else jnp.take(kvseg, j[0, 0], axis=1)[:, None, None]
    mask = mask & (qseg[:, None, None, :, :, None] == kseg[..., None, :])
  return mask


def _scores(cfg, qb, kg, mask):
  s = jnp.einsum(f"bhgnqd,{_kspec(cfg)}->bhgnqk", qb, kg, preferred_element_type=F32) * cfg.scale
  return jnp.where(mask, s, NEG_INF)


def _prepare(cfg, q, k, v, segs, idx, counts):
  """Chunked q and per-chunk metadata (the xs of the chunk loop), blocked k / v, blocked kv segment ids."""
  hkv = k.shape[2]
  kb, vb = _kv_blocks(k, cfg), _kv_blocks(v, cfg)
  idx, counts, qblk = _list_chunks(cfg, idx, counts)
  qseg = kvseg = None
  if segs is not None:
    qseg = _pad_axis1(segs[0], cfg.bs * cfg.qc).reshape(q.shape[0], -1, cfg.qc, cfg.bs).swapaxes(0, 1)
    kvseg = _pad_axis1(segs[1], cfg.bs).reshape(k.shape[0], -1, cfg.bs)
  return (_q_chunks(q, cfg, hkv), qseg, idx, counts, qblk), kb, vb, kvseg


def _slot_loop(cfg, counts, body, init):
  """Runs body(slot, carry) over the slots of one chunk: static length if known, else its max count at run time."""
  if cfg.steps == 1:
    return body(0, init)
  return lax.fori_loop(0, cfg.steps if cfg.steps is not None else jnp.max(counts), body, init)


def _chunk_scan(body, carry, xs):
  """lax.scan over chunks, called directly for a single chunk (small shapes compile faster)."""
  if jax.tree.leaves(xs)[0].shape[0] > 1:
    return lax.scan(body, carry, xs)
  carry, y = body(carry, jax.tree.map(lambda x: x[0], xs))
  return carry, jax.tree.map(lambda a: a[None], y)


# ----------------------------------------------------------------------------- forward

def _forward(cfg, q, k, v, segs, idx, counts):
  xs, kb, vb, kvseg = _prepare(cfg, q, k, v, segs, idx, counts)

  def one_chunk(_, chunk):
    qb, qseg, idx_c, counts_c, qblk = chunk
    cs = None if qseg is None else (qseg, kvseg)

    def body(c, carry):
      m, l, acc = carry
      j = lax.dynamic_index_in_dim(idx_c, c, axis=-1, keepdims=False)
      s = _scores(cfg, qb, _gather(cfg, kb, j), _mask(cfg, j, c < counts_c, qblk, cs))
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # nothing visible yet: exp(-inf) = 0
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      vg = _gather(cfg, vb, j)
      pv = jnp.einsum(f"bhgnqk,{_kspec(cfg)}->bhgnqd", p.astype(vg.dtype), vg, preferred_element_type=F32)
      return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    stat = qb.shape[:-1]  # [B, Hkv, G, qc, bq]
    init = (jnp.full(stat, NEG_INF, F32), jnp.zeros(stat, F32), jnp.zeros(qb.shape, F32))
    m, l, acc = _slot_loop(cfg, counts_c, body, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]  # no visible key -> 0, not NaN
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return None, (out.astype(q.dtype), lse)

  _, (out, lse) = _chunk_scan(one_chunk, None, xs)
  return _q_unchunks(out, cfg), lse  # lse stays chunked: [n_chunks, B, Hkv, G, qc, bq]


# ----------------------------------------------------------------------------- backward

def _sparse_fwd(cfg, q, k, v, segs, idx, counts):
  out, lse = _forward(cfg, q, k, v, segs, idx, counts)
  return out, (q, k, v, segs, idx, counts, out, lse)


def _sparse_bwd(cfg, res, dout):
  q, k, v, segs, idx, counts, out, lse = res
  hkv = k.shape[2]
  xs, kb, vb, kvseg = _prepare(cfg, q, k, v, segs, idx, counts)
  dob = _q_chunks(dout, cfg, hkv)
  delta = jnp.einsum("cbhgnqd,cbhgnqd->cbhgnq", dob, _q_chunks(out, cfg, hkv), preferred_element_type=F32)
  ks = _kspec(cfg)

  def one_chunk(dkv, chunk):
    qb, qseg, idx_c, counts_c, qblk, do, lse_c, delta_c = chunk
    cs = None if qseg is None else (qseg, kvseg)

    def body(c, carry):
      dq, dk, dv = carry
      j = lax.dynamic_index_in_dim(idx_c, c, axis=-1, keepdims=False)
      kg, vg = _gather(cfg, kb, j), _gather(cfg, vb, j)
      p = jnp.exp(_scores(cfg, qb, kg, _mask(cfg, j, c < counts_c, qblk, cs)) - lse_c[..., None])  # masked -> 0
      dp = jnp.einsum(f"bhgnqd,{ks}->bhgnqk", do, vg, preferred_element_type=F32)
      ds = p * (dp - delta_c[..., None])
      dq = dq + jnp.einsum(f"bhgnqk,{ks}->bhgnqd", ds.astype(kg.dtype), kg, preferred_element_type=F32)
      dk = _scatter_add(cfg, dk, j, jnp.einsum(f"bhgnqk,bhgnqd->{ks}", ds.astype(qb.dtype), qb,
                                               preferred_element_type=F32))
      dv = _scatter_add(cfg, dv, j, jnp.einsum(f"bhgnqk,bhgnqd->{ks}", p.astype(do.dtype), do,
                                               preferred_element_type=F32))
      return dq, dk, dv

    dq, dk, dv = _slot_loop(cfg, counts_c, body, (jnp.zeros(qb.shape, F32), *dkv))
    return (dk, dv), (dq * cfg.scale).astype(q.dtype)

  init = (jnp.zeros(kb.shape, F32), jnp.zeros(vb.shape, F32))
  (dk, dv), dq = _chunk_scan(one_chunk, init, (*xs, dob, lse, delta))
  dk = _kv_unblocks((dk * cfg.scale).astype(k.dtype), cfg)
  return _q_unchunks(dq, cfg), dk, _kv_unblocks(dv.astype(v.dtype), cfg), None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_vjp(cfg, q, k, v, segs, idx, counts):
  return _forward(cfg, q, k, v, segs, idx, counts)[0]


_sparse_vjp.defvjp(_sparse_fwd, _sparse_bwd)
_sparse = jax.jit(_sparse_vjp, static_argnums=0)  # eager callers get one cached executable
