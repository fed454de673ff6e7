"""Blockwise (flash-style) attention in plain JAX: the reference every other kernel is checked against.

Why this shape: it has to run everywhere (CPU tests, any accelerator as the last rung of the fallback ladder) and
still handle long sequences, so it never builds the [Lq, Lk] score matrix. The forward maps over query blocks and
scans over key/value blocks with an online softmax (running max, running sum and accumulator, all float32). The
backward is a hand-written flash backward (``jax.custom_vjp``) that recomputes scores from the saved log-sum-exp,
so training memory is O(L) per layer rather than one saved carry per (q block, kv block) pair.

Masks are built per block from positions, never stored: kv padding, causal (queries are the LAST Lq positions of
the Lk keys), sliding window (i - j < window) and segment ids (equal ids only). A query that sees no key outputs 0.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
NEG_INF = -jnp.inf


class _Cfg(NamedTuple):
  """Static (hashable) settings; the lengths are the unpadded ones."""
  causal: bool
  window: Optional[int]
  scale: float
  bq: int
  bk: int
  lq: int
  lk: int


def xla_attention(q, k, v, *, causal=False, segment_ids=None, sliding_window=None, scale=None,
                  q_block=256, kv_block=256):
  """Attention over [batch, length, heads, head_dim]; see ``kernels.attention`` for the argument contract.

  ``segment_ids`` is None, one [B, L] array (Lq == Lk) or a (q_ids [B, Lq], kv_ids [B, Lk]) pair. Unlike the
  dispatcher it does not validate shapes. ``sliding_window`` and ``scale`` must be Python numbers (static).
  ``q_block`` / ``kv_block`` bound the score block held in memory; a length up to one block is a single block.
  """
  lq, lk, d = q.shape[1], k.shape[1], q.shape[-1]
  cfg = _Cfg(bool(causal), None if sliding_window is None else int(sliding_window),
             float(d ** -0.5 if scale is None else scale), min(q_block, lq), min(kv_block, lk), lq, lk)
  if segment_ids is not None:
    pair = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
    segment_ids = tuple(jnp.asarray(s, jnp.int32) for s in pair)
  return _flash(cfg, q, k, v, segment_ids)


# ----------------------------------------------------------------------------- layout helpers

def _blocks(x, block, axis=1):
  """Splits `axis` (length L) into blocks and moves the block index first: [..., L, ...] ->
  [L_pad // block, ..., block, ...], zero-padding L up to a block multiple."""
  pad = -x.shape[axis] % block
  x = jnp.pad(x, [(0, pad) if i == axis else (0, 0) for i in range(x.ndim)])
  x = x.reshape(*x.shape[:axis], -1, block, *x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _unblocks(x, length, axis=1):
  """Inverse of ``_blocks``."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
  return lax.slice_in_dim(x, 0, length, axis=axis)


def _heads_major(x, hkv):
  """[B, L, H, D] -> [B, Hkv, G, L, D] (G = H // Hkv): every matmul below is then a plain batched matmul over
  (B, Hkv) with contiguous free dims; XLA:CPU runs the [B, L, H, D] layout's 5-D einsums ~3x slower."""
  b, l, h, d = x.shape
  return jnp.transpose(x.reshape(b, l, hkv, h // hkv, d), (0, 2, 3, 1, 4))


def _tokens_major(x):
  """Inverse of ``_heads_major``: [B, Hkv, G, L, D] -> [B, L, H, D]."""
  b, hkv, g, l, d = x.shape
  return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(b, l, hkv * g, d)


def _prepare(cfg, q, k, v, segs):
  """Blocks everything, heads-major: q [nq, B, Hkv, G, bq, D], k and v [nk, B, Hkv, bk, D]."""
  hkv = k.shape[2]
  qb = _blocks(_heads_major(q, hkv), cfg.bq, axis=3)
  kb, vb = (_blocks(_heads_major(x, hkv)[:, :, 0], cfg.bk, axis=2) for x in (k, v))
  iq = jnp.arange(qb.shape[0] * cfg.bq).reshape(-1, cfg.bq)  # [nq, bq]; rows >= lq are padding
  ik = jnp.arange(kb.shape[0] * cfg.bk).reshape(-1, cfg.bk)  # [nk, bk]; cols >= lk are padding
  qseg, kseg = (None, None) if segs is None else (_blocks(segs[0], cfg.bq), _blocks(segs[1], cfg.bk))
  return qb, kb, vb, (iq, qseg), (ik, kseg)


def _scores(cfg, q, k, qmeta, kmeta):
  """Scaled float32 scores [B, Hkv, G, bq, bk] with -inf where masked."""
  s = jnp.einsum("bhgqd,bhkd->bhgqk", q, k, preferred_element_type=F32) * cfg.scale
  (iq, qseg), (ik, kseg) = qmeta, kmeta
  qpos = iq + (cfg.lk - cfg.lq)  # queries are the last lq positions
  mask = (iq < cfg.lq)[:, None] & (ik < cfg.lk)[None, :]
  if cfg.causal:
    mask &= ik[None, :] <= qpos[:, None]
  if cfg.window is not None:
    mask &= qpos[:, None] - ik[None, :] < cfg.window
  mask = mask[None]
  if qseg is not None:
    mask = mask & (qseg[:, :, None] == kseg[:, None, :])
  return jnp.where(mask[:, None, None], s, NEG_INF)


def _scan(body, init, xs):
  """lax.scan, called directly for a single block: small shapes (most test and decode calls) compile faster."""
  if jax.tree.leaves(xs)[0].shape[0] > 1:
    return lax.scan(body, init, xs)
  carry, y = body(init, jax.tree.map(lambda x: x[0], xs))
  return carry, jax.tree.map(lambda a: a[None], y)


def _map(fn, xs):
  return _scan(lambda _, x: (None, fn(x)), None, xs)[1]


# Causal attention over a few query blocks unrolls the loop over them in Python, so each block's kv scan stops at
# the last block it can see: at 4 blocks that is 10 of 16 block pairs (fwd+bwd at L 512: 154 -> 118 ms on CPU;
# with the one-pass backward below, 90 ms).
_UNROLL = 16
_FUSED_PAIRS = 16  # backward: up to this many (q block, kv block) pairs run as one unrolled pass (scores once)


def _skips(cfg, nq: int) -> bool:
  return cfg.causal and 1 < nq <= _UNROLL


def _kv_stop(cfg, i: int, nk: int) -> int:
  """Number of kv blocks query block i can see under the causal mask (queries are the last lq positions)."""
  last = cfg.lk - cfg.lq + min((i + 1) * cfg.bq, cfg.lq) - 1
  return min(nk, last // cfg.bk + 1)


def _take(xs, start, stop):
  return jax.tree.map(lambda x: x[start:stop], xs)


def _stack(outs):
  return jax.tree.map(lambda *o: jnp.stack(o), *outs)


def _over_q_blocks(cfg, fn, qs, kv):
  """[fn(*query block i of qs, the kv blocks it can see) for each i], stacked."""
  nq, nk = jax.tree.leaves(qs)[0].shape[0], jax.tree.leaves(kv)[0].shape[0]
  if not _skips(cfg, nq):
    return _map(lambda x: fn(*x, kv), qs)
  return _stack([fn(*jax.tree.map(lambda x: x[i], qs), _take(kv, 0, _kv_stop(cfg, i, nk))) for i in range(nq)])


def _over_kv_blocks(cfg, fn, kvs, qs):
  """[fn(*kv block j of kvs, the query blocks that see it) for each j], stacked."""
  nk, nq = jax.tree.leaves(kvs)[0].shape[0], jax.tree.leaves(qs)[0].shape[0]
  if not _skips(cfg, nq):
    return _map(lambda x: fn(*x, qs), kvs)
  firsts = [next(i for i in range(nq) if _kv_stop(cfg, i, nk) > j) for j in range(nk)]
  return _stack([fn(*jax.tree.map(lambda x: x[j], kvs), _take(qs, firsts[j], nq)) for j in range(nk)])


# ----------------------------------------------------------------------------- forward

def _forward(cfg, q, k, v, segs):
  qb, kb, vb, qmeta, kmeta = _prepare(cfg, q, k, v, segs)

  def one_q_block(q_blk, qm, kv):
    b, h, g, bq, d = q_blk.shape

    def kv_step(carry, xs):
      m, l, acc = carry
      k_blk, v_blk, km = xs
      s = _scores(cfg, q_blk, k_blk, qm, km)
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows with nothing visible yet: exp(-inf) = 0
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = alpha * l + p.sum(-1)
      pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=F32)
      return (m_new, l, alpha[..., None] * acc + pv), None

    init = (jnp.full((b, h, g, bq), NEG_INF, F32), jnp.zeros((b, h, g, bq), F32), jnp.zeros((b, h, g, bq, d), F32))
    (m, l, acc), _ = _scan(kv_step, init, kv)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]  # no visible key -> 0, not NaN
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return out.astype(q.dtype), lse  # out [B, Hkv, G, bq, D]

  out, lse = _over_q_blocks(cfg, one_q_block, (qb, qmeta), (kb, vb, kmeta))
  return _tokens_major(_unblocks(out, cfg.lq, axis=3)), lse  # lse stays blocked: [nq, B, Hkv, G, bq]


# ----------------------------------------------------------------------------- backward

def _flash_fwd(cfg, q, k, v, segs):
  out, lse = _forward(cfg, q, k, v, segs)
  return out, (q, k, v, segs, out, lse)


def _dq_part(ds, k_blk):  # one block pair's float32 contribution to dq (unscaled)
  return jnp.einsum("bhgqk,bhkd->bhgqd", ds.astype(k_blk.dtype), k_blk, preferred_element_type=F32)


def _dk_part(ds, q_blk):  # ... to dk (unscaled)
  return jnp.einsum("bhgqk,bhgqd->bhkd", ds.astype(q_blk.dtype), q_blk, preferred_element_type=F32)


def _dv_part(p, do_blk):  # ... to dv
  return jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(do_blk.dtype), do_blk, preferred_element_type=F32)


def _flash_bwd(cfg, res, dout):
  q, k, v, segs, out, lse = res
  qb, kb, vb, qmeta, kmeta = _prepare(cfg, q, k, v, segs)
  hkv = k.shape[2]
  do_hm = _heads_major(dout, hkv)
  dob = _blocks(do_hm, cfg.bq, axis=3)
  delta = jnp.einsum("bhgqd,bhgqd->bhgq", do_hm, _heads_major(out, hkv), preferred_element_type=F32)
  delta = _blocks(delta, cfg.bq, axis=3)  # rowsum(dO * O), blocked like lse

  def probs_and_ds(q_blk, do_blk, lse_blk, delta_blk, qm, k_blk, v_blk, km):
    p = jnp.exp(_scores(cfg, q_blk, k_blk, qm, km) - lse_blk[..., None])
    dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_blk, v_blk, preferred_element_type=F32)
    return p, p * (dp - delta_blk[..., None])

  def dq_for_q_block(q_blk, do_blk, lse_blk, delta_blk, qm, kv):  # pass 1: dq, scanning kv blocks

    def step(acc, xs):
      k_blk, v_blk, km = xs
      _, ds = probs_and_ds(q_blk, do_blk, lse_blk, delta_blk, qm, k_blk, v_blk, km)
      return acc + _dq_part(ds, k_blk), None

    acc, _ = _scan(step, jnp.zeros(q_blk.shape, F32), kv)
    return (acc * cfg.scale).astype(q.dtype)

  def dkv_for_kv_block(k_blk, v_blk, km, qs):  # pass 2: dk and dv, scanning q blocks

    def step(carry, xs):
      dk, dv = carry
      q_blk, do_blk, lse_blk, delta_blk, qm = xs
      p, ds = probs_and_ds(q_blk, do_blk, lse_blk, delta_blk, qm, k_blk, v_blk, km)
      dv = dv + _dv_part(p, do_blk)
      dk = dk + _dk_part(ds, q_blk)
      return (dk, dv), None

    zeros = jnp.zeros(k_blk.shape, F32)
    (dk, dv), _ = _scan(step, (zeros, zeros), qs)
    return (dk * cfg.scale).astype(k.dtype), dv.astype(v.dtype)

  qs = (qb, dob, lse, delta, qmeta)
  nq, nk = qb.shape[0], kb.shape[0]
  if nq * nk <= _FUSED_PAIRS:  # one pass: each visible block pair's probabilities feed dq, dk and dv at once
    dq, dk, dv = [0.0] * nq, [0.0] * nk, [0.0] * nk
    for i in range(nq):
      q_blk, do_blk, lse_blk, delta_blk, qm = jax.tree.map(lambda x: x[i], qs)
      for j in range(_kv_stop(cfg, i, nk) if cfg.causal else nk):
        k_blk, v_blk, km = jax.tree.map(lambda x: x[j], (kb, vb, kmeta))
        p, ds = probs_and_ds(q_blk, do_blk, lse_blk, delta_blk, qm, k_blk, v_blk, km)
        dq[i] = dq[i] + _dq_part(ds, k_blk)
        dk[j] = dk[j] + _dk_part(ds, q_blk)
        dv[j] = dv[j] + _dv_part(p, do_blk)
    full = lambda xs, like, scale: jnp.stack([jnp.broadcast_to(x * scale, like.shape[1:]) for x in xs])
    dq = full(dq, qb, cfg.scale).astype(q.dtype)  # (a block no pair reached stays the float 0.0: broadcast)
    dk, dv = full(dk, kb, cfg.scale).astype(k.dtype), full(dv, vb, 1.0).astype(v.dtype)
  else:
    dq = _over_q_blocks(cfg, dq_for_q_block, qs, (kb, vb, kmeta))
    dk, dv = _over_kv_blocks(cfg, dkv_for_kv_block, (kb, vb, kmeta), qs)
  dq = _tokens_major(_unblocks(dq, cfg.lq, axis=3))
  dk, dv = (jnp.swapaxes(_unblocks(x, cfg.lk, axis=2), 1, 2) for x in (dk, dv))  # [B, Hkv, L, D] -> [B, L, Hkv, D]
  return dq, dk, dv, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_vjp(cfg, q, k, v, segs):
  return _forward(cfg, q, k, v, segs)[0]


_flash_vjp.defvjp(_flash_fwd, _flash_bwd)
_flash = jax.jit(_flash_vjp, static_argnums=0)  # eager callers get one cached executable, not op-by-op dispatch
