"""Flash attention for NVIDIA GPUs in Pallas, lowered through Triton; forward and backward are Pallas kernels.

Why this module: on GPU the XLA reference (``kernels.xla_attention``) goes through HBM between every step of its
block loop. Here one program per (batch, head, block) keeps its tiles in registers or shared memory for the whole loop.
``interpret=True`` runs the same kernels through the Pallas interpreter, which is how CI on CPU tests them.

Layout and padding. Inputs stay [batch, length, heads, head_dim]: BlockSpecs squeeze the head axis, so nothing is
transposed. Triton needs power-of-two tiles of at least 16, so head_dim is zero-padded to the next power of two
(64 -> 64; 72, 80, 128 -> 128; the zero columns change no score or output) and both lengths are padded to block
multiples. Padded keys are masked by position. Padded query rows are discarded (and masked in dk/dv). Padding is
done outside the ``custom_vjp``, so autodiff drops the padded part of the gradients. GQA: query head h reads kv head
h // G straight through the BlockSpec index map, so k and v are never repeated. The dk/dv kernel runs one program per
kv head and sums over the G query heads of its group in registers, so each dk/dv block is written exactly once.

``attention_bwd`` runs only the backward, from another forward's saved out and LSE (``kernels.triton_attention``
uses it).

Kernels (grid, then loop):
  forward  (B, Hq, nq)  loop over kv blocks; online softmax in float32; writes out and the log-sum-exp (LSE).
  dq       (B, Hq, nq)  loop over kv blocks; recomputes p = exp(s - LSE); delta = rowsum(dO * O) comes from XLA.
  dk/dv    (B, Hkv, nk) loop over the G query heads of the group, then over q blocks.
Masked scores are -inf. A row's running max is replaced by 0 while it is still -inf, so a query that sees no key
ends with l = 0 and outputs exactly 0 (LSE 0, so p = 0 and its gradients are 0), never NaN.

Skipping blocks (these blocks are never visited; skipping is more than just writing zeros):
  * causal / sliding window: the loop bounds come from the block's position range (queries are the LAST Lq
    positions), so the loops run only over the band of blocks that can hold a visible pair.
  * segment ids: ids are edge-padded, so each block's [min, max] id range covers only real tokens. A kv block
    whose range misses the q block's range is skipped by a ``lax.cond`` around the block body. It is not
    ``pl.when``, because Triton Pallas has no scratch buffers: the accumulators are loop carries, and the cond
    passes them through unchanged. Unsorted ids (such as padding 0 after the last segment) widen a range and
    so only weaken the skipping; the result is still right.
  * block_layout: outside the kernel the layout is ANDed with the causal/window block mask and turned into a
    "plan" per (head, q block): [count, kv block indices..., unused]. The loop runs ``count`` times over the listed
    blocks only. dk/dv use the transposed plan. Unmarked blocks cost nothing and count as masked.

Block sizes: ``block_q`` / ``block_k`` (default 64 x 64) are used by all three kernels. 64 x 64 is meant to keep the
dk/dv kernel, which holds k, v, dk, dv, q, dO and four score tiles, inside the register file at head_dim 128; the
forward may gain from 128 x 64 on H100 (not tuned yet: that needs the hardware). Each is
clamped to the next power of two of its length (at least 16, the smallest Triton dot), so decode (Lq = 1) uses a
16-row block. With a layout both are ``block_size``. Compiled, they must be powers of two >= 16 (anything else
raises NotImplementedError, and the dispatcher falls through); interpreted, any size works. float32 inputs use
IEEE float32 dots (``Precision.HIGHEST``; Triton's default would be TF32) so that values match the reference to
about 1e-6; 16-bit inputs use tensor-core dots with float32 accumulation.

Plan for Mosaic GPU (Hopper, ``jax.experimental.pallas.mosaic_gpu`` / ``plgpu``). The Triton lowering is
deprecated from jax 0.11. This module stays the GPU path for as long as the jax versions we support ship it, and
the Mosaic kernel will be added beside it under its own registry name. What changes:
  * matmuls become warpgroup MMAs (``plgpu.wgmma``) on shared-memory tiles: q tiles of a multiple of 64 rows per
    consumer warpgroup, two consumer warpgroups per program (as jax's ``ops/gpu/attention_mgpu.py`` does). The
    score and accumulator tiles live in wgmma register layouts, so row statistics use layout-aware reductions.
  * k/v are streamed by TMA (``plgpu.copy_gmem_to_smem`` + barriers, or ``plgpu.emit_pipeline``) into a ring of
    ``max_concurrent_steps`` shared-memory slots filled by a producer warpgroup. This replaces Triton's
    ``num_stages`` software pipelining.
  * block shapes follow the swizzle and TMA rules: head_dim a multiple of 64 (72/80 padded to 128 as here),
    kv tiles 64-128, lengths still padded to block multiples. The plan/count arrays become scalar loads from
    SMEM/GMEM that drive the TMA slot indices.
  * skipping rules, the plan format, padding and the LSE/delta contract of the backward stay the same, so both
    kernels share the wrapper code and the tests.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from qwen3vl.kernels import target

try:  # The Triton-specific compiler params; gone once jax drops the Triton lowering.
  from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover - depends on the installed jax
  _pltriton = None

F32 = jnp.float32
NEG_INF = -float("inf")
PLATFORM = "gpu"
MAX_LAYOUT_TILE = 64  # tile side a large layout block is split into (shared memory; see _config)


class _Cfg(NamedTuple):
  """Static settings (hashable: jit and custom_vjp key on them). Lengths are the unpadded ones."""
  causal: bool
  window: Optional[int]
  scale: float
  bq: int
  bk: int
  lq: int
  lk: int
  groups: int  # query heads per kv head
  segments: bool
  layout_heads: int  # 0: no layout, 1: one layout for all heads, Hq: one per query head
  interpret: bool
  num_warps: int
  num_stages: int
  precise: bool  # float32 inputs: IEEE dots


def pallas_gpu_attention(q, k, v, *, causal=False, segment_ids=None, sliding_window=None, scale=None,
                         block_layout=None, block_size=None, interpret=None, block_q=64, block_k=64,
                         num_warps=None, num_stages=2):
  """Flash attention over [batch, length, heads, head_dim]; see ``kernels.attention`` for the mask semantics.

  Args beyond the attention contract:
    block_layout: None, or a bool array [nq, nk] or [Hq, nq, nk] over blocks of ``block_size`` tokens
      (nq = cdiv(Lq, block_size), nk = cdiv(Lk, block_size)); only marked blocks are computed. It combines with the
      causal / window / segment masks, and a query that sees no key in its marked blocks outputs 0.
    block_size: the layout's block (then block_q = block_k = block_size); without a layout it sets both.
    interpret: None runs compiled on a GPU backend and raises NotImplementedError elsewhere (so the dispatcher
      falls through); True runs the kernels in the Pallas interpreter on any platform.
    block_q, block_k: tile sizes (clamped for short inputs), num_warps / num_stages: Triton settings.

  Returns [batch, Lq, Hq, head_dim] in q.dtype. Differentiable w.r.t. q, k, v (Pallas backward).
  """
  cfg, segs, layout = _config(q, k, v, causal, segment_ids, sliding_window, scale, block_layout, block_size,
                              interpret, block_q, block_k, num_warps, num_stages)
  return _run(cfg, q, k, v, segs, layout)


def attention_bwd(q, k, v, out, lse, dout, *, causal=False, segment_ids=None, sliding_window=None, scale=None,
                  block_layout=None, block_size=None, interpret=None, block_q=64, block_k=64, num_warps=None,
                  num_stages=2):
  """(dq, dk, dv) from a forward's saved ``out`` [B, Lq, Hq, D] and natural-log ``lse`` [B, Hq, Lq] (float32).

  For other forward kernels (e.g. ``kernels.triton_attention``): the backward consumes their residuals instead of
  recomputing a forward. ``lse`` must be 0 (any finite value) for queries that see no key. Arguments are as for
  ``pallas_gpu_attention``; it raises NotImplementedError off GPU unless ``interpret=True``.
  """
  cfg, segs, layout = _config(q, k, v, causal, segment_ids, sliding_window, scale, block_layout, block_size,
                              interpret, block_q, block_k, num_warps, num_stages)
  if out.shape != q.shape or lse.shape != (q.shape[0], q.shape[2], q.shape[1]) or dout.shape != q.shape:
    raise ValueError(f"out{out.shape} and dout{dout.shape} must match q{q.shape}, lse{lse.shape} must be "
                     f"[B, Hq, Lq]")
  return _run_bwd(cfg, q, k, v, out, lse, dout, segs, layout)


def _config(q, k, v, causal, segment_ids, sliding_window, scale, block_layout, block_size, interpret, block_q,
            block_k, num_warps, num_stages):
  """Validates the arguments; returns (static config, segment id pair or None, layout or None)."""
  if interpret is None:
    if target.target_platform() != PLATFORM:
      raise NotImplementedError(f"pallas_gpu_attention runs compiled only on GPU (the target is "
                                f"{target.target_platform()!r}); pass interpret=True to interpret it")
    interpret = False
  interpret = bool(interpret)
  if _pltriton is None and not interpret:
    raise NotImplementedError("this jax has no Pallas Triton lowering")
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"expected q [B, Lq, Hq, D], k = v [B, Lk, Hkv, D]; got q{q.shape} k{k.shape} v{v.shape}")
  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  if k.shape[0] != b or k.shape[3] != d or hq % hkv:
    raise ValueError(f"q{q.shape} and k{k.shape} must agree on batch and head_dim, and Hkv must divide Hq")
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) != 1 or next(iter(dtypes)) not in (jnp.dtype(F32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise NotImplementedError(f"pallas_gpu_attention needs q, k, v all float32, bfloat16 or float16; got {dtypes}")
  lk = k.shape[1]
  if sliding_window is not None and int(sliding_window) <= 0:
    raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")

  if block_layout is not None:
    if block_size is None:
      raise ValueError("block_layout needs block_size")
    bq = bk = int(block_size)
    nq, nk = -(-lq // bq), -(-lk // bk)
    shape = tuple(np.shape(block_layout))
    if shape not in ((nq, nk), (hq, nq, nk)):
      raise ValueError(f"block_layout shape {shape} must be ({nq}, {nk}) or ({hq}, {nq}, {nk}) for Lq={lq}, "
                       f"Lk={lk}, block_size={bq}")
    layout_heads = 1 if len(shape) == 2 else hq
    if bq > MAX_LAYOUT_TILE and bq % MAX_LAYOUT_TILE == 0:
      # Large layout blocks (the vision tower's 128) as tiles of MAX_LAYOUT_TILE: 128 x 128 tiles of q, k, v
      # overflow the H100's 227 KiB of shared memory (f32 at any head_dim, bf16 at 128 on B200, found by
      # compiling for them). Each block's mark is repeated over its tiles, so the same token pairs are computed.
      r = bq // MAX_LAYOUT_TILE
      bq = bk = MAX_LAYOUT_TILE
      block_layout = jnp.repeat(jnp.repeat(jnp.asarray(block_layout, bool), r, axis=-2), r, axis=-1)
      block_layout = block_layout[..., :-(-lq // bq), :-(-lk // bk)]
  else:
    if block_size is not None:
      block_q = block_k = int(block_size)
    bq, bk = _clamp_block(int(block_q), lq), _clamp_block(int(block_k), lk)
    layout_heads = 0
  if not interpret and not (_pow2(bq) and _pow2(bk) and min(bq, bk) >= 16):
    raise NotImplementedError(f"compiled Triton tiles must be powers of two >= 16; got block_q={bq}, block_k={bk}")

  if segment_ids is not None:
    pair = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
    segment_ids = tuple(jnp.asarray(s, jnp.int32) for s in pair)
    if segment_ids[0].shape != (b, lq) or segment_ids[1].shape != (b, lk):
      raise ValueError(f"segment_ids shapes {segment_ids[0].shape}, {segment_ids[1].shape} must be ({b}, {lq}) "
                       f"and ({b}, {lk})")
  cfg = _Cfg(causal=bool(causal), window=None if sliding_window is None else int(sliding_window),
             scale=float(d ** -0.5 if scale is None else scale), bq=bq, bk=bk, lq=lq, lk=lk, groups=hq // hkv,
             segments=segment_ids is not None, layout_heads=layout_heads, interpret=interpret,
             num_warps=int(num_warps or (4 if d <= 64 else 8)), num_stages=int(num_stages),
             precise=q.dtype == F32)
  layout = None if block_layout is None else jnp.asarray(block_layout, bool)
  return cfg, segment_ids, layout


def _pow2(n):
  return n > 0 and n & (n - 1) == 0


def _clamp_block(block, length):
  """A block no longer than needed: next power of two of the length, but at least 16 (Triton's smallest dot)."""
  return max(1, min(block, max(16, pl.next_power_of_2(length))))


# ----------------------------------------------------------------------------- wrapper (runs in XLA)

@functools.partial(jax.jit, static_argnums=0)
def _run(cfg, q, k, v, segs, layout):
  """Pads, builds plans, runs the custom-VJP core on the padded arrays and cuts the padding off again."""
  (qp, kp, vp), segs, plans = _pad(cfg, (q,), (k, v), segs, layout)
  out = _attention(cfg, qp, kp, vp, segs, plans)
  return out[:, :cfg.lq, :, :q.shape[-1]]


@functools.partial(jax.jit, static_argnums=0)
def _run_bwd(cfg, q, k, v, out, lse, dout, segs, layout):
  (qp, outp, doutp, kp, vp), segs, plans = _pad(cfg, (q, out.astype(q.dtype), dout.astype(q.dtype)), (k, v), segs,
                                                layout)
  lse = jnp.pad(lse.astype(F32), ((0, 0), (0, 0), (0, qp.shape[1] - cfg.lq)))
  dq, dk, dv = _backward(cfg, qp, kp, vp, outp, lse, doutp, segs, plans)
  d = q.shape[-1]
  return dq[:, :cfg.lq, :, :d], dk[:, :cfg.lk, :, :d], dv[:, :cfg.lk, :, :d]


def _pad(cfg, q_like, kv_like, segs, layout):
  """Lengths to block multiples and head_dim to a power of two (>= 16) with zeros; segment ids edge-padded, so
  each block's [min, max] id range stays that of its real tokens; the layout becomes plans."""
  lq_pad, lk_pad = _round_up(cfg.lq, cfg.bq), _round_up(cfg.lk, cfg.bk)
  d = q_like[0].shape[-1]
  dp = max(16, pl.next_power_of_2(d))
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - d)))
  if segs is not None:
    segs = (jnp.pad(segs[0], ((0, 0), (0, lq_pad - cfg.lq)), mode="edge"),
            jnp.pad(segs[1], ((0, 0), (0, lk_pad - cfg.lk)), mode="edge"))
  plans = None if layout is None else _plans(cfg, layout)
  return [pad(x, lq_pad) for x in q_like] + [pad(x, lk_pad) for x in kv_like], segs, plans


def _round_up(n, m):
  return -(-n // m) * m


def _plans(cfg, layout):
  """Layout -> (plan [Hl, nq, 1 + nk], transposed plan [Hl, nk, 1 + nq]) as int32.

  Row r of a plan is [count, the marked block indices in increasing order..., leftovers]. The layout is first ANDed
  with the static causal/window block mask, so the kernels need no loop bounds of their own.
  """
  if layout.ndim == 2:
    layout = layout[None]
  layout = layout & jnp.asarray(_band_mask(cfg, layout.shape[1], layout.shape[2]))

  def plan(mask):
    order = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)  # marked blocks first, in order
    return jnp.concatenate([mask.sum(-1, dtype=jnp.int32)[..., None], order], axis=-1)

  return plan(layout), plan(jnp.swapaxes(layout, 1, 2))


def _band_mask(cfg, nq, nk):
  """[nq, nk] numpy bools: block pairs holding at least one causal/window-visible (query, key) pair."""
  off = cfg.lk - cfg.lq
  iq, ik = np.arange(nq)[:, None], np.arange(nk)[None, :]
  q_first = iq * cfg.bq + off
  q_last = np.minimum(iq * cfg.bq + cfg.bq - 1, cfg.lq - 1) + off
  k_first, k_last = ik * cfg.bk, np.minimum(ik * cfg.bk + cfg.bk - 1, cfg.lk - 1)
  keep = np.ones((nq, nk), bool)
  if cfg.causal:
    keep &= k_first <= q_last
  if cfg.window is not None:
    keep &= q_first - k_last < cfg.window
  return keep


# ----------------------------------------------------------------------------- in-kernel helpers

def _dot(cfg, a, b, contract):
  """2-D matmul with float32 accumulation; contract = (a's dim, b's dim). HIGHEST = IEEE float32 on Triton."""
  return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())), preferred_element_type=F32,
                         precision=lax.Precision.HIGHEST if cfg.precise else None)


def _cdiv(a, b):
  """Ceil division of a non-negative (possibly traced) int by a static int. Python's // on the traced int keeps
  its dtype (a static int is weakly typed); lax.div would see int64 for it under jax_enable_x64 and refuse."""
  return (a + (b - 1)) // b


def _mask(cfg, q_rows, k_cols, q_ids=None, k_ids=None, mask_q_padding=False):
  """[bq, bk] visibility (or None when everything is visible) from query rows and key columns (int vectors)."""
  masks = []
  if cfg.lk % cfg.bk:
    masks.append((k_cols < cfg.lk)[None, :])
  if mask_q_padding and cfg.lq % cfg.bq:
    masks.append((q_rows < cfg.lq)[:, None])
  q_pos = q_rows + (cfg.lk - cfg.lq)  # queries are the last lq positions
  if cfg.causal:
    masks.append(k_cols[None, :] <= q_pos[:, None])
  if cfg.window is not None:
    masks.append(q_pos[:, None] - k_cols[None, :] < cfg.window)
  if q_ids is not None:
    masks.append(q_ids[:, None] == k_ids[None, :])
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = out & m
  return out


def _scores(cfg, q, k, mask):
  s = _dot(cfg, q, k, (1, 1)) * cfg.scale
  return s if mask is None else jnp.where(mask, s, NEG_INF)


def _kv_bounds(cfg, iq):
  """[lo, hi) kv blocks that can hold a causal/window-visible key for q block iq (traced)."""
  off = cfg.lk - cfg.lq
  lo, hi = 0, -(-cfg.lk // cfg.bk)
  if cfg.causal:
    q_last = jnp.minimum(iq * cfg.bq + cfg.bq - 1, cfg.lq - 1) + off
    hi = jnp.minimum(hi, _cdiv(jnp.maximum(q_last + 1, 0), cfg.bk))
  if cfg.window is not None:
    lo = jnp.maximum(iq * cfg.bq + off - cfg.window + 1, 0) // cfg.bk
  return lo, hi


def _q_bounds(cfg, ik):
  """[lo, hi) q blocks that can hold a query seeing some key of kv block ik (traced)."""
  off = cfg.lk - cfg.lq
  lo, hi = 0, -(-cfg.lq // cfg.bq)
  if cfg.causal:
    lo = jnp.maximum(ik * cfg.bk - off, 0) // cfg.bq
  if cfg.window is not None:
    k_last = jnp.minimum(ik * cfg.bk + cfg.bk - 1, cfg.lk - 1)
    hi = jnp.minimum(hi, _cdiv(jnp.maximum(k_last + cfg.window - off, 0), cfg.bq))
  return lo, hi


def _visit(lo_hi, plan_row, body, carry, ids=None, this_range=None):
  """Runs carry = body(j, carry, other_ids) over the blocks j to visit: a plan row, else the [lo, hi) band.

  ids(j) loads the other side's segment ids for block j. When given, blocks whose [min, max] id range misses
  ``this_range`` are skipped with a lax.cond that passes the carry through.
  """
  if ids is None:
    step = lambda j, c: body(j, c, None)
  else:
    lo_id, hi_id = this_range

    def step(j, c):
      other = ids(j)
      hit = (jnp.min(other) <= hi_id) & (jnp.max(other) >= lo_id)
      return lax.cond(hit, lambda c: body(j, c, other), lambda c: c, c)

  if plan_row is not None:
    return lax.fori_loop(0, plan_row(0), lambda t, c: step(plan_row(t + 1), c), carry)
  lo, hi = lo_hi
  return lax.fori_loop(lo, hi, step, carry)


def _unpack(refs, cfg, names):
  """Splits the kernel's refs by name; segment and plan refs are present only when configured."""
  it = iter(refs)
  out = {}
  for name in names:
    if name in ("q_ids", "k_ids") and not cfg.segments:
      out[name] = None
    elif name == "plan" and not cfg.layout_heads:
      out[name] = None
    else:
      out[name] = next(it)
  assert next(it, None) is None
  return out


# ----------------------------------------------------------------------------- kernels

def _fwd_kernel(*refs, cfg):
  r = _unpack(refs, cfg, ("q", "k", "v", "q_ids", "k_ids", "plan", "o", "lse"))
  iq = pl.program_id(2)
  q = r["q"][...]
  q_rows = iq * cfg.bq + jnp.arange(cfg.bq)
  q_ids = None if r["q_ids"] is None else r["q_ids"][...]

  def body(j, carry, k_ids):
    m, l, acc = carry
    cols = pl.ds(pl.multiple_of(j * cfg.bk, cfg.bk), cfg.bk)
    k, v = r["k"][cols, :], r["v"][cols, :]
    s = _scores(cfg, q, k, _mask(cfg, q_rows, j * cfg.bk + jnp.arange(cfg.bk), q_ids, k_ids))
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # nothing visible yet: exp(-inf - 0) = 0, not NaN
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + _dot(cfg, p.astype(v.dtype), v, (1, 0))
    return m_new, l, acc

  init = (jnp.full((cfg.bq,), NEG_INF, F32), jnp.zeros((cfg.bq,), F32), jnp.zeros(q.shape, F32))
  plan = None if r["plan"] is None else (lambda t: r["plan"][t])
  ids = None if q_ids is None else (lambda j: r["k_ids"][pl.ds(pl.multiple_of(j * cfg.bk, cfg.bk), cfg.bk)])
  q_range = None if q_ids is None else (jnp.min(q_ids), jnp.max(q_ids))
  m, l, acc = _visit(_kv_bounds(cfg, iq), plan, body, init, ids, q_range)
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  r["o"][...] = (acc / l_safe[:, None]).astype(r["o"].dtype)  # no visible key: acc = 0 -> 0
  r["lse"][...] = jnp.where(seen, m + jnp.log(l_safe), 0.0)


def _dq_kernel(*refs, cfg):
  r = _unpack(refs, cfg, ("q", "k", "v", "do", "lse", "delta", "q_ids", "k_ids", "plan", "dq"))
  iq = pl.program_id(2)
  q, do = r["q"][...], r["do"][...]
  lse, delta = r["lse"][...], r["delta"][...]
  q_rows = iq * cfg.bq + jnp.arange(cfg.bq)
  q_ids = None if r["q_ids"] is None else r["q_ids"][...]

  def body(j, dq, k_ids):
    cols = pl.ds(pl.multiple_of(j * cfg.bk, cfg.bk), cfg.bk)
    k, v = r["k"][cols, :], r["v"][cols, :]
    s = _scores(cfg, q, k, _mask(cfg, q_rows, j * cfg.bk + jnp.arange(cfg.bk), q_ids, k_ids))
    p = jnp.exp(s - lse[:, None])
    ds = p * (_dot(cfg, do, v, (1, 1)) - delta[:, None])
    return dq + _dot(cfg, ds.astype(k.dtype), k, (1, 0))

  plan = None if r["plan"] is None else (lambda t: r["plan"][t])
  ids = None if q_ids is None else (lambda j: r["k_ids"][pl.ds(pl.multiple_of(j * cfg.bk, cfg.bk), cfg.bk)])
  q_range = None if q_ids is None else (jnp.min(q_ids), jnp.max(q_ids))
  dq = _visit(_kv_bounds(cfg, iq), plan, body, jnp.zeros(q.shape, F32), ids, q_range)
  r["dq"][...] = (dq * cfg.scale).astype(r["dq"].dtype)


def _dkv_kernel(*refs, cfg):
  r = _unpack(refs, cfg, ("q", "k", "v", "do", "lse", "delta", "q_ids", "k_ids", "plan", "dk", "dv"))
  ik = pl.program_id(2)
  k, v = r["k"][...], r["v"][...]
  k_cols = ik * cfg.bk + jnp.arange(cfg.bk)
  k_ids = None if r["k_ids"] is None else r["k_ids"][...]
  ids = None if k_ids is None else (lambda i: r["q_ids"][pl.ds(pl.multiple_of(i * cfg.bq, cfg.bq), cfg.bq)])
  k_range = None if k_ids is None else (jnp.min(k_ids), jnp.max(k_ids))
  bounds = _q_bounds(cfg, ik)

  def for_head(g, carry):
    def body(i, carry, q_ids):
      dk, dv = carry
      rows = pl.ds(pl.multiple_of(i * cfg.bq, cfg.bq), cfg.bq)
      q, do = r["q"][rows, g, :], r["do"][rows, g, :]
      lse, delta = r["lse"][g, rows], r["delta"][g, rows]
      mask = _mask(cfg, i * cfg.bq + jnp.arange(cfg.bq), k_cols, q_ids, k_ids, mask_q_padding=True)
      p = jnp.exp(_scores(cfg, q, k, mask) - lse[:, None])
      dv = dv + _dot(cfg, p.astype(do.dtype), do, (0, 0))
      ds = p * (_dot(cfg, do, v, (1, 1)) - delta[:, None])
      return dk + _dot(cfg, ds.astype(q.dtype), q, (0, 0)), dv

    plan = None
    if r["plan"] is not None:
      head = g if cfg.layout_heads > 1 else 0
      plan = lambda t: r["plan"][head, t]
    return _visit(bounds, plan, body, carry, ids, k_range)

  zeros = jnp.zeros(k.shape, F32)
  if cfg.groups == 1:
    dk, dv = for_head(0, (zeros, zeros))
  else:
    dk, dv = lax.fori_loop(0, cfg.groups, for_head, (zeros, zeros))
  r["dk"][...] = (dk * cfg.scale).astype(r["dk"].dtype)
  r["dv"][...] = dv.astype(r["dv"].dtype)


# ----------------------------------------------------------------------------- pallas_call wrappers

def _call(cfg, kernel, name, grid, in_specs, out_specs, out_shape, *args):
  params = {}
  if not cfg.interpret:
    params["compiler_params"] = _pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  return pl.pallas_call(functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=cfg.interpret, name=name, **params)(*args)


def _optional_inputs(cfg, segs, plan, q_ids_spec, k_ids_spec, plan_spec):
  """Segment ids and plan inputs with their BlockSpecs, only where configured."""
  args, specs = [], []
  if segs is not None:
    args += list(segs)
    specs += [q_ids_spec, k_ids_spec]
  if plan is not None:
    args.append(plan)
    specs.append(plan_spec)
  return args, specs


def _fwd_call(cfg, q, k, v, segs, plans):
  b, lq_pad, hq, dp = q.shape
  lk_pad, g = k.shape[1], cfg.groups
  nq = lq_pad // cfg.bq
  q_spec = pl.BlockSpec((None, cfg.bq, None, dp), lambda b, h, i: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, lk_pad, None, dp), lambda b, h, i: (b, 0, h // g, 0))
  extra, extra_specs = _optional_inputs(
      cfg, segs, None if plans is None else plans[0],
      pl.BlockSpec((None, cfg.bq), lambda b, h, i: (b, i)), pl.BlockSpec((None, lk_pad), lambda b, h, i: (b, 0)),
      pl.BlockSpec((None, None, None if plans is None else plans[0].shape[-1]),
                   lambda b, h, i: (h if cfg.layout_heads > 1 else 0, i, 0)))
  return _call(cfg, _fwd_kernel, "flash_attention_fwd", (b, hq, nq),
               [q_spec, kv_spec, kv_spec, *extra_specs],
               [q_spec, pl.BlockSpec((None, None, cfg.bq), lambda b, h, i: (b, h, i))],
               [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, lq_pad), F32)],
               q, k, v, *extra)


def _dq_call(cfg, q, k, v, do, lse, delta, segs, plans):
  b, lq_pad, hq, dp = q.shape
  lk_pad, g = k.shape[1], cfg.groups
  q_spec = pl.BlockSpec((None, cfg.bq, None, dp), lambda b, h, i: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, lk_pad, None, dp), lambda b, h, i: (b, 0, h // g, 0))
  row_spec = pl.BlockSpec((None, None, cfg.bq), lambda b, h, i: (b, h, i))
  extra, extra_specs = _optional_inputs(
      cfg, segs, None if plans is None else plans[0],
      pl.BlockSpec((None, cfg.bq), lambda b, h, i: (b, i)), pl.BlockSpec((None, lk_pad), lambda b, h, i: (b, 0)),
      pl.BlockSpec((None, None, None if plans is None else plans[0].shape[-1]),
                   lambda b, h, i: (h if cfg.layout_heads > 1 else 0, i, 0)))
  return _call(cfg, _dq_kernel, "flash_attention_dq", (b, hq, lq_pad // cfg.bq),
               [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *extra_specs], q_spec,
               jax.ShapeDtypeStruct(q.shape, q.dtype), q, k, v, do, lse, delta, *extra)


def _dkv_call(cfg, q, k, v, do, lse, delta, segs, plans):
  b, lq_pad, hq, dp = q.shape
  lk_pad, hkv, g = k.shape[1], k.shape[2], cfg.groups
  q_spec = pl.BlockSpec((None, lq_pad, g, dp), lambda b, h, j: (b, 0, h, 0))  # the G query heads of kv head h
  kv_spec = pl.BlockSpec((None, cfg.bk, None, dp), lambda b, h, j: (b, j, h, 0))
  row_spec = pl.BlockSpec((None, g, lq_pad), lambda b, h, j: (b, h, 0))
  plan = None if plans is None else plans[1]
  per_head = cfg.layout_heads > 1
  extra, extra_specs = _optional_inputs(
      cfg, segs, plan,
      pl.BlockSpec((None, lq_pad), lambda b, h, j: (b, 0)), pl.BlockSpec((None, cfg.bk), lambda b, h, j: (b, j)),
      pl.BlockSpec((g if per_head else 1, None, None if plan is None else plan.shape[-1]),
                   lambda b, h, j: (h if per_head else 0, j, 0)))
  return _call(cfg, _dkv_kernel, "flash_attention_dkv", (b, hkv, lk_pad // cfg.bk),
               [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *extra_specs], [kv_spec, kv_spec],
               [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
               q, k, v, do, lse, delta, *extra)


# ----------------------------------------------------------------------------- custom VJP (on padded arrays)

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, segs, plans):
  return _fwd_call(cfg, q, k, v, segs, plans)[0]


def _attention_fwd(cfg, q, k, v, segs, plans):
  out, lse = _fwd_call(cfg, q, k, v, segs, plans)
  return out, (q, k, v, segs, plans, out, lse)


def _attention_bwd(cfg, res, dout):
  q, k, v, segs, plans, out, lse = res
  return (*_backward(cfg, q, k, v, out, lse, dout.astype(q.dtype), segs, plans), None, None)


def _backward(cfg, q, k, v, out, lse, dout, segs, plans):
  """dq, dk, dv on padded arrays: delta = rowsum(dO * O) in XLA (one fused pass, laid out like the LSE), then
  the dq and dk/dv kernels."""
  delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(F32), out.astype(F32), precision=lax.Precision.HIGHEST)
  dq = _dq_call(cfg, q, k, v, dout, lse, delta, segs, plans)
  dk, dv = _dkv_call(cfg, q, k, v, dout, lse, delta, segs, plans)
  return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)
