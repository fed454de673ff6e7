"""Pallas TPU flash attention, run by the TPU interpreter on CPU: values vs float64 numpy, grads vs dense jnp.

Interpret mode is slow (every grid step goes through host callbacks), so the shapes are tiny, blocks are 16 or 32
to still get several blocks per sequence, and each case is a single jitted forward + VJP. The interpreter fills
buffers the kernel never writes with NaN (made explicit below), so a forgotten output block fails the finiteness
and value checks. The compiled path only runs where jax.default_backend() == "tpu".
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from qwen3vl.kernels import pallas_tpu_attention as pta, pallas_tpu_tables as skip_tables
from qwen3vl.kernels.pallas_tpu_attention import pallas_tpu_attention

POISON = pltpu.InterpretParams(uninitialized_memory="nan")


def _segments(rows, length):
  """One row per batch element from (id, run length) pairs; the rest of the row is padding id 0."""
  out = np.zeros((len(rows), length), np.int32)
  for b, runs in enumerate(rows):
    at = 0
    for seg, n in runs:
      out[b, at:at + n] = seg
      at += n
  return out


def _mask(b, hq, lq, lk, causal, window, segs, layout=None, block=None):
  """[B, Hq, Lq, Lk] visibility, positions as in kernels.attention (queries are the last Lq positions)."""
  qpos, kpos = np.arange(lq)[:, None] + lk - lq, np.arange(lk)[None, :]
  m = np.ones((b, hq, lq, lk), bool)
  if causal:
    m &= kpos <= qpos
  if window is not None:
    m &= qpos - kpos < window
  if segs is not None:
    m &= (segs[0][:, :, None] == segs[1][:, None, :])[:, None]
  if layout is not None:
    lay = np.broadcast_to(layout, (hq,) + layout.shape[-2:])
    m &= np.repeat(np.repeat(lay, block, 1), block, 2)[None, :, :lq, :lk]
  return m


def _dense_np(q, k, v, mask, scale):
  """float64 reference; rows with no visible key are 0."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, 2), np.repeat(v, g, 2)
  s = np.where(mask, np.einsum("bqhd,bkhd->bhqk", q, k) * scale, -np.inf)
  mx = s.max(-1, keepdims=True)
  e = np.exp(s - np.where(np.isfinite(mx), mx, 0))
  z = e.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", e / np.where(z > 0, z, 1), v)


def _dense_jnp(q, k, v, mask, scale):
  """float32 dense attention, differentiable, for gradient references."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, 2), jnp.repeat(v, g, 2)
  s = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, -1e30)
  p = jax.nn.softmax(s, -1) * jnp.any(mask, -1)[..., None]
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(b, lq, lk, hq, hkv, d, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(b, lq, hq, d), (b, lk, hkv, d), (b, lk, hkv, d), (b, lq, hq, d)]
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype) for s in shapes)


# The interpreter's programs are big host-callback loops: XLA's optimisations buy nothing there, and skipping them
# cuts compile time (the bulk of this file's run time) by about a third.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _value_and_grads(fn, ct):
  """One jitted call: fn(q, k, v) and the grads of sum(fn * ct) w.r.t. q, k, v."""
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct.astype(out.dtype))
  return jax.jit(run, compiler_options=FAST_COMPILE)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


SEG37 = _segments([[(1, 5), (2, 13), (3, 11)], [(4, 21), (5, 3)]], 37)  # odd runs, padding id 0 at the end
SEG20 = SEG37[:, :20].copy()
SEG20[0, [3, 11]] = 9  # an id no key has: these queries see nothing and must output exactly 0
SEG203 = _segments([[(1, 40), (2, 100), (3, 50)]], 203)
CASES = {  # name: (b, hq, hkv, lq, lk, d, causal, window, segments, block_q, block_k); few cases: each compiles 3 kernels
    "causal_seg_gqa_d80": (2, 2, 1, 37, 37, 80, True, None, "same", 16, 16),
    "len127_d128_bq16_bk32": (1, 1, 1, 127, 127, 128, False, None, None, 16, 32),
    "causal_window_seg_d72_len203": (1, 2, 1, 203, 203, 72, True, 40, "203", 32, 32),
    "decode_lq1": (1, 2, 1, 1, 37, 64, True, None, None, 16, 16),
    "pair_segments_window_noncausal_bq8": (2, 2, 1, 20, 37, 64, False, 5, "pair", 8, 16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense(name):
  """Values (float64 numpy) and dq, dk, dv (dense jnp); rows that see no key are exactly 0."""
  b, hq, hkv, lq, lk, d, causal, window, seg, bq, bk = CASES[name]
  q, k, v, ct = _inputs(b, lq, lk, hq, hkv, d)
  segs = {None: None, "same": (SEG37, SEG37), "pair": (SEG20, SEG37), "203": (SEG203, SEG203)}[seg]
  mask, scale = _mask(b, hq, lq, lk, causal, window, segs), d ** -0.5
  fn = lambda q, k, v: pallas_tpu_attention(q, k, v, causal=causal, segment_ids=segs, sliding_window=window,
                                            interpret=POISON, block_q=bq, block_k=bk)
  out, grads = _value_and_grads(fn, ct)(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _rel(out, _dense_np(q, k, v, mask, scale)) <= 2e-5
  blind = np.moveaxis(~mask.any(-1), 1, 2)  # [B, Lq, Hq]: queries without a visible key
  np.testing.assert_array_equal(np.asarray(out)[blind], 0.0)
  _, want = _value_and_grads(lambda q, k, v: _dense_jnp(q, k, v, mask, scale), ct)(q, k, v)
  for got, ref, arg in zip(grads, want, "qkv"):
    assert bool(jnp.isfinite(got).all()), f"d{arg} not finite"
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5, err_msg=f"d{arg}")


def test_block_layout_per_head_with_causal():
  """A random per-head layout over 16-token blocks (both lengths odd), combined with causal and a custom scale."""
  b, hq, hkv, lq, lk, d, bs = 1, 2, 1, 37, 45, 64, 16
  rng = np.random.default_rng(3)
  layout = rng.random((hq, 3, 3)) < 0.6
  layout[:, :, 0] = True  # let every query keep at least its first block
  layout[1, 2] = False  # ... except the last q block of head 1: fully masked rows must give 0
  q, k, v, ct = _inputs(b, lq, lk, hq, hkv, d, seed=4)
  mask = _mask(b, hq, lq, lk, True, None, None, layout, bs)
  fn = lambda q, k, v: pallas_tpu_attention(q, k, v, causal=True, scale=0.2, block_layout=layout, block_size=bs,
                                            interpret=POISON)
  out, grads = _value_and_grads(fn, ct)(q, k, v)
  assert _rel(out, _dense_np(q, k, v, mask, 0.2)) <= 2e-5
  np.testing.assert_array_equal(out[0, 32:, 1], 0.0)
  _, want = _value_and_grads(lambda q, k, v: _dense_jnp(q, k, v, mask, 0.2), ct)(q, k, v)
  for got, ref, arg in zip(grads, want, "qkv"):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5, err_msg=f"d{arg}")
  # A traced layout (e.g. built inside jit) takes the dynamic-table path; forward only (no lse output).
  traced = jax.jit(lambda lay: pallas_tpu_attention(q, k, v, causal=True, scale=0.2, block_layout=lay,
                                                    block_size=bs, interpret=POISON))(jnp.asarray(layout))
  np.testing.assert_allclose(traced, out, rtol=1e-6, atol=1e-6)


def test_skipped_blocks_are_not_computed():
  """NaN in k/v blocks that no query may see: skipped blocks never reach the math, so everything stays finite.

  16 queries at positions 64..79 of 80 keys, causal with a window of 24: they see keys 41..79, so kv blocks 0-1
  (keys 0..31) are skipped statically. kv segment ids make block 3 (keys 48..63) foreign to every query: skipped
  dynamically. Had either been computed, 0 * NaN would poison the output (masking only replaces the scores).
  """
  b, hq, hkv, lq, lk, d = 1, 2, 1, 16, 80, 64
  q, k, v, ct = _inputs(b, lq, lk, hq, hkv, d, seed=5)
  q_ids = np.ones((b, lq), np.int32)
  kv_ids = np.ones((b, lk), np.int32)
  kv_ids[:, 48:64] = 2
  dead = np.zeros(lk, bool)
  dead[:32] = dead[48:64] = True
  k, v = (x.at[:, dead].set(jnp.nan) for x in (k, v))
  segs = (q_ids, kv_ids)
  fn = lambda q, k, v: pallas_tpu_attention(q, k, v, causal=True, sliding_window=24, segment_ids=segs,
                                            interpret=POISON, block_q=16, block_k=16)
  out, (dq, dk, dv) = _value_and_grads(fn, ct)(q, k, v)
  mask = _mask(b, hq, lq, lk, True, 24, segs)
  assert not mask[..., dead].any()
  live = ~dead
  want = _dense_np(q, k[:, live], v[:, live], mask[..., live], d ** -0.5)
  assert bool(jnp.isfinite(out).all()) and _rel(out, want) <= 2e-5
  assert bool(jnp.isfinite(dq).all())
  assert bool(jnp.isfinite(dk[:, live]).all()) and bool(jnp.isfinite(dv[:, live]).all())
  np.testing.assert_array_equal(dk[:, dead], 0.0)  # nobody sees them: written as zero, not left as NaN poison
  np.testing.assert_array_equal(dv[:, dead], 0.0)


def test_skip_tables():
  """Lists are exact for causal / window geometry and shrink with block-aligned segments."""
  cfg_args = dict(causal=True, window=None, bq=32, bk=32, lq=203, lk=203, nq=7, nk=7)
  vis = skip_tables.static_visibility(**cfg_args)
  np.testing.assert_array_equal(vis, np.tril(np.ones((7, 7), bool)))
  vis_w = skip_tables.static_visibility(True, 40, 32, 32, 203, 203, 7, 7)
  assert vis_w.sum(-1).max() == 3  # a 40-token window touches at most 3 blocks of 32
  idx, cnt = skip_tables.lists(jnp.asarray(vis_w), 3)
  np.testing.assert_array_equal(cnt, [1, 2, 3, 3, 3, 3, 3])
  np.testing.assert_array_equal(idx[1], [0, 1, 1])  # tail repeats the last listed block: nothing new fetched
  np.testing.assert_array_equal(idx[3], [1, 2, 3])
  cfg = pta._Cfg(False, None, 1.0, 16, 16, 64, 64, 64, 64, 1, 1, 1, 4, 4, None)
  ids = jnp.asarray(np.repeat([[1, 2, 3, 0]], 16, 1))
  seg_vis = skip_tables.segment_visibility(cfg, (ids, ids))
  np.testing.assert_array_equal(seg_vis[0], np.eye(4, dtype=bool))


def test_bf16_inputs():
  q, k, v, ct = _inputs(2, 37, 37, 2, 1, 64, dtype=jnp.bfloat16)
  fn = lambda q, k, v: pallas_tpu_attention(q, k, v, causal=True, segment_ids=(SEG37, SEG37), interpret=POISON,
                                            block_q=16, block_k=16)
  out, grads = _value_and_grads(fn, ct)(q, k, v)
  assert out.dtype == jnp.bfloat16
  mask = _mask(2, 2, 37, 37, True, None, (SEG37, SEG37))
  np.testing.assert_allclose(np.asarray(out, np.float32), _dense_np(q, k, v, mask, 0.125), atol=3e-2)
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  _, want = _value_and_grads(lambda q, k, v: _dense_jnp(q, k, v, mask, 0.125), ct.astype(jnp.float32))(
      q32, k32, v32)
  for got, ref, arg in zip(grads, want, "qkv"):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=0.1, rtol=0.05, err_msg=f"d{arg}")


def test_platform_gating():
  q, k, v, _ = _inputs(1, 8, 8, 2, 1, 64)
  if jax.default_backend() != "tpu":
    with pytest.raises(NotImplementedError):
      pallas_tpu_attention(q, k, v)
    with pltpu.force_tpu_interpret_mode(POISON):  # interpret=None honours the interpreter context
      out = pallas_tpu_attention(q, k, v, causal=True)
    np.testing.assert_allclose(out, _dense_np(q, k, v, _mask(1, 2, 8, 8, True, None, None), 0.125), rtol=2e-5,
                               atol=2e-6)
  with pytest.raises(ValueError, match="block_layout"):
    pallas_tpu_attention(q, k, v, block_layout=np.ones((2, 2), bool), block_size=8, interpret=True)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="compiled Mosaic path needs a TPU")
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_on_tpu(causal):
  b, hq, hkv, l, d = 2, 4, 2, 300, 80
  q, k, v, ct = _inputs(b, l, l, hq, hkv, d)
  segs = _segments([[(1, 100), (2, 150)], [(3, 300)]], l)
  mask = _mask(b, hq, l, l, causal, 64, (segs, segs))
  fn = lambda q, k, v: pallas_tpu_attention(q, k, v, causal=causal, sliding_window=64, segment_ids=(segs, segs))
  out, grads = _value_and_grads(fn, ct)(q, k, v)
  assert _rel(out, _dense_np(q, k, v, mask, d ** -0.5)) <= 1e-4
  _, want = _value_and_grads(lambda q, k, v: _dense_jnp(q, k, v, mask, d ** -0.5), ct)(q, k, v)
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
