"""Flash-attention forward as a hand-written Triton kernel, called from JAX through ``jax_triton.triton_call``.

Why a Triton kernel beside the Pallas GPU one: the Pallas Triton lowering is deprecated from jax 0.11 (Mosaic GPU
replaces it), while Triton itself keeps working through jax-triton. This path is the GPU fallback that does not
depend on Pallas' GPU lowering. jax-triton has no CPU path and no autodiff, so:

* ``jax_triton`` is imported lazily, inside the call, and only after ``jax.default_backend() == "gpu"``; CPU
  installs never import it. Any failure to import it raises ``NotImplementedError`` (the dispatcher falls through).
* ``triton`` itself is also imported lazily (``flash_fwd_kernel()`` builds and caches the ``@triton.jit``
  kernel), so importing this module costs nothing. The kernel is plain ``triton.language`` and can be launched
  without jax-triton: the tests run it under Triton's interpreter with torch CPU tensors (see
  tests/test_triton_attention.py), which checks the kernel math on machines without a GPU.
* The backward is a ``jax.custom_vjp``. It uses, in order of preference: ``kernels.pallas_gpu_attention.
  attention_bwd(q, k, v, out, lse, dout, ...)`` (consumes the out and LSE saved here, no recomputation; the
  tests feed it this kernel's interpreted outputs); else ``jax.vjp`` of ``pallas_gpu_attention`` (recomputes one
  Pallas forward); else ``jax.vjp`` of the XLA reference (recomputes one XLA forward). Each of them declines off
  GPU or for unsupported arguments with NotImplementedError and the next is tried. All are flash backwards.

Kernel design (one program per (query block, batch * query head)):

* Layout [B, L, H, D] is read in place (row-major strides computed in the kernel); nothing is padded or
  transposed in JAX. Lengths are handled by masked loads/stores (``pos < L``), head_dim by loading a
  power-of-two ``D_PAD`` >= 16 columns with ``d < head_dim`` masks (tl.dot needs power-of-two tiles >= 16).
* GQA: query head h reads kv head ``h // (HQ // HKV)`` directly; k/v are never repeated.
* Online softmax in float32 with ``exp2`` (scores pre-multiplied by scale * log2(e)); P is cast to v's dtype
  for the PV product (bf16 inputs: bf16 tensor-core dots with float32 accumulation). float32 inputs use
  ``input_precision="ieee"`` so float32 parity with the XLA reference is not lost to TF32.
* Skipping: the kv loop range is bounded statically per query block for causal (keys past the block's last
  query position are never visited) and sliding window (keys before the first query's window are never
  visited). Segment ids skip a kv block dynamically when its [min, max] id range does not overlap the query
  block's. Inside visited blocks the full mask (length, causal, window, segments) is applied element-wise.
* A query with no visible key outputs exactly 0 and LSE 0 (finite, so a backward's exp(s - lse) stays 0).
* Block sizes: BLOCK_M 128 x BLOCK_N 64 (the Triton tutorial's Hopper/Ampere choice for head_dim <= 128),
  shrunk to the next power of two >= 16 of short lengths (decode: Lq = 1 uses a 16-row block); 8 warps for
  D_PAD 128, else 4. Not autotuned yet: see benchmarks/RESULTS.md.

Saved LSE layout: float32 [B, Hq, Lq], natural log.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from qwen3vl.kernels import target

MAX_HEAD_DIM = 128
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))

triton = None  # set by flash_fwd_kernel(); module globals so the @triton.jit body resolves `tl` as a global
tl = None


class _Cfg(NamedTuple):
  """Static (hashable) settings for one call."""
  causal: bool
  window: Optional[int]
  scale: float
  block_m: int
  block_n: int
  num_warps: int
  num_stages: int


def _pow2(n: int, lo: int = 16) -> int:
  return max(lo, 1 << max(0, int(n) - 1).bit_length())


def block_sizes(lq: int, lk: int, head_dim: int, block_m: int = 128, block_n: int = 64):
  """(BLOCK_M, BLOCK_N, D_PAD): default tiles shrunk to short lengths; all powers of two >= 16."""
  return min(block_m, _pow2(lq)), min(block_n, _pow2(lk)), _pow2(head_dim)


@functools.lru_cache(maxsize=None)
def flash_fwd_kernel():
  """Imports triton and returns the ``@triton.jit`` forward kernel (built once).

  Parameter order follows jax-triton's convention: inputs (arrays, then scalars), then output pointers, then
  constexpr meta-parameters. Launch grid: (cdiv(Lq, BLOCK_M), B * HQ).
  """
  global triton, tl
  import triton as _triton
  import triton.language as _tl
  triton, tl = _triton, _tl

  @triton.jit
  def _flash_fwd(q_ptr, k_ptr, v_ptr, qseg_ptr, kseg_ptr, scale, lq, lk, o_ptr, lse_ptr,
                 HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)  # int64 batch offsets: B * L * H * D can pass 2**31
    h = bh % HQ
    hk = h // (HQ // HKV)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < lq
    qpos = offs_m + (lk - lq)  # queries are the last lq of the lk positions

    q_rows = q_ptr + b * lq * HQ * HEAD_DIM + h * HEAD_DIM
    k_rows = k_ptr + b * lk * HKV * HEAD_DIM + hk * HEAD_DIM
    v_rows = v_ptr + b * lk * HKV * HEAD_DIM + hk * HEAD_DIM
    q = tl.load(q_rows + offs_m[:, None] * (HQ * HEAD_DIM) + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    if HAS_SEG:
      qseg = tl.load(qseg_ptr + b * lq + offs_m, mask=m_ok, other=0)
      qseg_lo = tl.min(tl.where(m_ok, qseg, 2147483647), 0)
      qseg_hi = tl.max(tl.where(m_ok, qseg, -2147483647), 0)

    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # Static skipping: only kv blocks that can hold a visible key for this query block.
    lo = 0
    hi = lk
    if CAUSAL:
      hi = tl.minimum(hi, (start_m + 1) * BLOCK_M + (lk - lq))
    if WINDOW > 0:
      lo = tl.maximum(start_m * BLOCK_M + (lk - lq) - WINDOW + 1, 0)
      lo = (lo // BLOCK_N) * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
      kpos = start_n + offs_n
      n_ok = kpos < lk
      visit = True
      if HAS_SEG:  # dynamic skipping: disjoint id ranges cannot match
        kseg = tl.load(kseg_ptr + b * lk + kpos, mask=n_ok, other=0)
        kseg_lo = tl.min(tl.where(n_ok, kseg, 2147483647), 0)
        kseg_hi = tl.max(tl.where(n_ok, kseg, -2147483647), 0)
        visit = (kseg_lo <= qseg_hi) & (kseg_hi >= qseg_lo)
      if visit:
        kv_off = kpos[:, None] * (HKV * HEAD_DIM) + offs_d[None, :]
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_rows + kv_off, mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = n_ok[None, :]
        if CAUSAL:
          ok = ok & (kpos[None, :] <= qpos[:, None])
        if WINDOW > 0:
          ok = ok & ((qpos[:, None] - kpos[None, :]) < WINDOW)
        if HAS_SEG:
          ok = ok & (qseg[:, None] == kseg[None, :])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: exp2(-inf) = 0, no NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_rows + kv_off, mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, 0.0)
    o_rows = o_ptr + b * lq * HQ * HEAD_DIM + h * HEAD_DIM
    tl.store(o_rows + offs_m[:, None] * (HQ * HEAD_DIM) + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + (b * HQ + h) * lq + offs_m, lse, mask=m_ok)

  return _flash_fwd


def launch_params(q_shape, k_shape, dtype, cfg: "_Cfg", has_seg: bool):
  """The grid and constexpr meta-parameters of one launch (shared by the jax-triton call and the tests)."""
  b, lq, hq, d = q_shape
  lk, hkv = k_shape[1], k_shape[2]
  _, _, d_pad = block_sizes(lq, lk, d)
  grid = (-(-lq // cfg.block_m), b * hq)
  meta = dict(HQ=hq, HKV=hkv, HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
              CAUSAL=cfg.causal, WINDOW=0 if cfg.window is None else cfg.window, HAS_SEG=has_seg,
              PRECISION="ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32")
  return grid, meta


def make_config(q_shape, k_shape, *, causal=False, sliding_window=None, scale=None, block_m=128, block_n=64,
                num_stages=3, dtype=None):
  """Static settings for given shapes; block sizes are clamped to the lengths (powers of two >= 16).

  float32 (IEEE dots, no tensor cores: a correctness path, not a fast one) caps BLOCK_M at 64 and the pipeline at
  2 stages: with the bf16 settings (128 rows, 3 stages, D_PAD 128) it compiled to 129-180 KiB of shared memory on
  sm_90 (bf16: 48 KiB), over an A100's per-block limit.
  """
  lq, lk, d = q_shape[1], k_shape[1], q_shape[-1]
  if dtype is not None and jnp.dtype(dtype) == jnp.float32:
    block_m, num_stages = min(block_m, 64), min(num_stages, 2)
  bm, bn, d_pad = block_sizes(lq, lk, d, block_m, block_n)
  return _Cfg(bool(causal), None if sliding_window is None else int(sliding_window),
              float(d ** -0.5 if scale is None else scale), bm, bn, 8 if d_pad >= 128 else 4, num_stages)


# ----------------------------------------------------------------------------- JAX entry point

_JT = {}


def _jax_triton():
  """Imports jax_triton once; any failure (CPU jaxlib, missing package, version skew) -> NotImplementedError."""
  if "mod" not in _JT:
    try:
      import jax_triton
      _JT["mod"], _JT["err"] = jax_triton, None
    except Exception as e:  # ImportError, or ValueError from a jaxlib without the Triton custom call
      _JT["mod"], _JT["err"] = None, f"{type(e).__name__}: {e}"
  if _JT["mod"] is None:
    raise NotImplementedError(f"jax_triton is not importable ({_JT['err']})")
  return _JT["mod"]


def _check(q, k, v, block_layout=None, interpret=None):
  """Raises NotImplementedError for what this backend does not do (so the dispatcher falls through)."""
  if block_layout is not None:
    raise NotImplementedError("triton_attention has no block-sparse layout support")
  if interpret:
    raise NotImplementedError("jax-triton has no interpret mode")
  if target.target_platform() != "gpu":
    raise NotImplementedError(f"triton_attention needs a GPU target, not {target.target_platform()}")
  if q.shape[-1] > MAX_HEAD_DIM:
    raise NotImplementedError(f"triton_attention supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
  if jnp.dtype(q.dtype) not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise NotImplementedError(f"triton_attention supports float32/float16/bfloat16, got {q.dtype}")
  _jax_triton()


def _segments(segment_ids):
  if segment_ids is None:
    return None
  pair = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
  return tuple(jnp.asarray(s, jnp.int32) for s in pair)


def triton_attention(q, k, v, *, causal=False, segment_ids=None, sliding_window=None, scale=None,
                     block_layout=None, block_size=None, interpret=None, block_m=128, block_n=64):
  """Flash attention through a Triton kernel; the argument contract of ``kernels.attention`` / Pallas backends.

  GPU only: raises ``NotImplementedError`` off GPU, when jax_triton cannot be imported, for a block layout,
  for ``interpret=True`` (jax-triton has no interpret mode; the kernel is tested with Triton's own interpreter),
  for head_dim > 128 and for dtypes other than float32/float16/bfloat16. ``block_size`` is ignored (it only
  goes with a layout); ``block_m`` / ``block_n`` set the tiles (powers of two >= 16).
  """
  del block_size
  _check(q, k, v, block_layout, interpret)
  cfg = make_config(q.shape, k.shape, causal=causal, sliding_window=sliding_window, scale=scale,
                    block_m=block_m, block_n=block_n, dtype=q.dtype)
  return _flash(cfg, q, k, v, _segments(segment_ids))


def triton_attention_with_lse(q, k, v, *, causal=False, segment_ids=None, sliding_window=None, scale=None):
  """Forward only (no VJP), also returning the LSE [B, Hq, Lq] (float32, natural log; 0 where nothing is seen)."""
  _check(q, k, v)
  cfg = make_config(q.shape, k.shape, causal=causal, sliding_window=sliding_window, scale=scale, dtype=q.dtype)
  return jax.jit(_forward, static_argnums=0)(cfg, q, k, v, _segments(segment_ids))


def _forward(cfg, q, k, v, segs):
  """One jax-triton launch: (out [B, Lq, Hq, D] in q.dtype, lse [B, Hq, Lq] float32)."""
  jt = _jax_triton()
  b, lq, hq, _ = q.shape
  grid, meta = launch_params(q.shape, k.shape, q.dtype, cfg, segs is not None)
  if segs is None:  # the kernel signature is fixed; HAS_SEG=False never reads these
    segs = (jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
  out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, lq), jnp.float32))
  return jt.triton_call(q, k, v, segs[0], segs[1], cfg.scale, lq, k.shape[1], kernel=flash_fwd_kernel(),
                        out_shape=out_shape, grid=grid, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        **meta)


def _flash_fwd_rule(cfg, q, k, v, segs):
  out, lse = _forward(cfg, q, k, v, segs)
  return out, (q, k, v, segs, out, lse)


def _flash_bwd_rule(cfg, res, dout):
  q, k, v, segs, out, lse = res
  kw = dict(causal=cfg.causal, segment_ids=segs, sliding_window=cfg.window, scale=cfg.scale)
  dq, dk, dv = backward(q, k, v, out, lse, dout, **kw)
  return dq, dk, dv, None


def backward(q, k, v, out, lse, dout, **kw):
  """(dq, dk, dv): the Pallas GPU backward when available, else the XLA reference's VJP (see module doc)."""
  try:
    from qwen3vl.kernels import pallas_gpu_attention as pallas
  except ImportError:
    pallas = None
  from_residuals = getattr(pallas, "attention_bwd", None)
  if from_residuals is not None:
    try:
      return tuple(from_residuals(q, k, v, out, lse, dout, **kw))
    except NotImplementedError:
      pass
  fwd = getattr(pallas, "pallas_gpu_attention", None)
  if fwd is not None:
    try:
      _, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, **kw), q, k, v)
      return vjp(dout)
    except NotImplementedError:
      pass
  from qwen3vl.kernels.xla_attention import xla_attention
  _, vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, **kw), q, k, v)
  return vjp(dout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_vjp(cfg, q, k, v, segs):
  return _forward(cfg, q, k, v, segs)[0]


_flash_vjp.defvjp(_flash_fwd_rule, _flash_bwd_rule)
_flash = jax.jit(_flash_vjp, static_argnums=0)
