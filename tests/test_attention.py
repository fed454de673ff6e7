"""kernels.attention: blockwise XLA path vs a dense float64 reference (values) and dense jnp (gradients)."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3vl import kernels
from qwen3vl.kernels import dispatch
from qwen3vl.kernels.xla_attention import xla_attention


def _segments(rows, length):
  """One row per batch element from (id, run length) pairs; the rest of the row is padding id 0."""
  out = np.zeros((len(rows), length), np.int32)
  for b, runs in enumerate(rows):
    at = 0
    for seg, n in runs:
      out[b, at:at + n] = seg
      at += n
  return out


def _mask(b, lq, lk, causal, window, segs):
  qpos, kpos = np.arange(lq)[:, None] + lk - lq, np.arange(lk)[None, :]
  m = np.ones((b, lq, lk), bool)
  if causal:
    m &= kpos <= qpos
  if window is not None:
    m &= qpos - kpos < window
  if segs is not None:
    m &= segs[0][:, :, None] == segs[1][:, None, :]
  return m


def _dense_np(q, k, v, mask, scale):
  """float64 reference; rows with no visible key are 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, 2), np.repeat(v, g, 2)
  s = np.where(mask[:, None], np.einsum("bqhd,bkhd->bhqk", q, k) * scale, -np.inf)
  mx = s.max(-1, keepdims=True)
  e = np.exp(s - np.where(np.isfinite(mx), mx, 0))
  z = e.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", e / np.where(z > 0, z, 1), v)


def _dense_jnp(q, k, v, mask, scale):
  """float32 dense attention, differentiable, for gradient references."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, 2), jnp.repeat(v, g, 2)
  s = jnp.where(mask[:, None], jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, -1e30)
  p = jax.nn.softmax(s, -1) * jnp.any(mask, -1)[:, None, :, None]
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(b, lq, lk, hq, hkv, d, dtype=jnp.float32, seed=0):
  """q, k, v and an output cotangent (numpy RNG: jax.random would compile per shape)."""
  rng = np.random.default_rng(seed)
  shapes = [(b, lq, hq, d), (b, lk, hkv, d), (b, lk, hkv, d), (b, lq, hq, d)]
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype) for s in shapes)


def _value_and_grads(fn, ct):
  """One jitted call: fn(q, k, v) and the grads of sum(fn * ct) w.r.t. q, k, v."""
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct.astype(out.dtype))
  return jax.jit(run)


SEG37 = _segments([[(1, 5), (2, 13), (3, 11)], [(4, 21), (5, 3)]], 37)  # odd runs, padding id 0 at the end
CASES = {  # name: (hq, hkv, lq, lk, d, causal, window, segments)
    "plain": (4, 2, 37, 37, 64, False, None, None),
    "causal_d72": (4, 2, 50, 50, 72, True, None, None),
    "causal_seg_gqa8_d80": (8, 1, 37, 37, 80, True, None, "same"),
    "seg_mha": (2, 2, 37, 37, 64, False, None, "same"),
    "window_d128": (4, 2, 50, 50, 128, True, 11, None),
    "window_noncausal": (4, 2, 37, 37, 64, False, 5, None),
    "decode_lq1": (4, 2, 1, 37, 64, True, None, None),
    "decode_lq5": (4, 2, 5, 50, 64, True, None, None),
    "decode_lq5_window": (4, 2, 5, 50, 64, True, 8, None),
    "pair_segments": (4, 1, 20, 37, 64, False, None, "pair"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_blockwise_matches_dense(name):
  hq, hkv, lq, lk, d, causal, window, seg = CASES[name]
  q, k, v, ct = _inputs(2, lq, lk, hq, hkv, d)
  segs = None if seg is None else (SEG37, SEG37) if seg == "same" else (SEG37[:, :lq], SEG37)
  mask, scale = _mask(2, lq, lk, causal, window, segs), d ** -0.5
  fn = lambda q, k, v: xla_attention(q, k, v, causal=causal, segment_ids=segs, sliding_window=window,
                                     q_block=16, kv_block=16)
  out, grads = _value_and_grads(fn, ct)(q, k, v)
  np.testing.assert_allclose(out, _dense_np(q, k, v, mask, scale), rtol=1e-5, atol=2e-6)
  _, want = _value_and_grads(lambda q, k, v: _dense_jnp(q, k, v, mask, scale), ct)(q, k, v)
  for got, ref, arg in zip(grads, want, "qkv"):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5, err_msg=f"d{arg}")


@pytest.mark.parametrize("block", [4, 16])  # 10 query blocks: the scanned path; 3: unrolled, masked blocks skipped
def test_causal_block_skipping_matches_dense(block):
  q, k, v, ct = _inputs(2, 37, 37, 4, 2, 32, seed=3)
  segs = (SEG37, SEG37)
  fn = lambda q, k, v: xla_attention(q, k, v, causal=True, segment_ids=segs, q_block=block, kv_block=block)
  out, grads = _value_and_grads(fn, ct)(q, k, v)
  mask = _mask(2, 37, 37, True, None, segs)
  np.testing.assert_allclose(out, _dense_np(q, k, v, mask, 32 ** -0.5), rtol=1e-5, atol=2e-6)
  _, want = _value_and_grads(lambda q, k, v: _dense_jnp(q, k, v, mask, 32 ** -0.5), ct)(q, k, v)
  for got, ref, arg in zip(grads, want, "qkv"):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5, err_msg=f"d{arg}")


@pytest.mark.parametrize("causal", [False, True])
def test_entry_point_single_block(causal):
  """Default block sizes (one block), public API, single-array segment_ids."""
  q, k, v, _ = _inputs(2, 37, 37, 4, 2, 64, seed=1)
  out = kernels.attention(q, k, v, causal=causal, segment_ids=jnp.asarray(SEG37), scale=0.1)
  want = _dense_np(q, k, v, _mask(2, 37, 37, causal, None, (SEG37, SEG37)), 0.1)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=2e-6)


def test_bf16_inputs():
  q, k, v, ct = _inputs(2, 37, 37, 4, 2, 64, dtype=jnp.bfloat16)
  fn = lambda q, k, v: xla_attention(q, k, v, causal=True, segment_ids=(SEG37, SEG37), q_block=16, kv_block=16)
  out, grads = _value_and_grads(fn, ct)(q, k, v)
  assert out.dtype == jnp.bfloat16
  want = _dense_np(q, k, v, _mask(2, 37, 37, True, None, (SEG37, SEG37)), 64 ** -0.5)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)
  assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g).all()) for g in grads)


def test_query_without_visible_key_is_zero():
  q, k, v, ct = _inputs(1, 6, 16, 2, 1, 64)
  q_ids = jnp.array([[1, 1, 7, 2, 7, 0]])  # id 7 never occurs among the keys
  kv_ids = jnp.array([[1] * 5 + [2] * 8 + [0] * 3])
  out, grads = _value_and_grads(lambda q, k, v: kernels.attention(q, k, v, segment_ids=(q_ids, kv_ids)), ct)(q, k, v)
  assert not bool(jnp.isnan(out).any())
  np.testing.assert_array_equal(out[0, 2], 0.0)
  np.testing.assert_array_equal(out[0, 4], 0.0)
  assert float(jnp.abs(out[0, 0]).sum()) > 0
  assert all(bool(jnp.isfinite(g).all()) for g in grads)
  np.testing.assert_array_equal(grads[0][0, 2], 0.0)


def test_unknown_implementation_names_valid_ones():
  q, k, v, _ = _inputs(1, 4, 4, 2, 2, 64)
  with pytest.raises(ValueError, match="xla"):
    kernels.attention(q, k, v, implementation="nope")


@pytest.mark.parametrize("kwargs, match", [
    (dict(shapes=((1, 4, 3, 64), (1, 4, 2, 64))), "divide"),
    (dict(shapes=((1, 3, 2, 64), (1, 4, 2, 64)), segment_ids=np.zeros((1, 4), np.int32)), "Lq == Lk"),
    (dict(shapes=((1, 4, 2, 64), (1, 4, 2, 32))), "head_dim"),
])
def test_bad_arguments_raise(kwargs, match):
  qs, ks = kwargs.pop("shapes")
  with pytest.raises(ValueError, match=match):
    kernels.attention(jnp.zeros(qs), jnp.zeros(ks), jnp.zeros(ks), **kwargs)


def test_fallback_ladder_and_logging(monkeypatch, caplog):
  # Start from the XLA reference alone, whatever kernels the package registered.
  monkeypatch.setattr(dispatch, "_REGISTRIES", {op: {"xla": r["xla"]} for op, r in dispatch._REGISTRIES.items()})
  monkeypatch.setattr(dispatch, "_LOGGED", set())

  def declines(*args, **kwargs):
    raise NotImplementedError("not on this platform")

  kernels.register_implementation("fake_kernel", declines)
  assert kernels.implementations() == ("fake_kernel", "xla")
  q, k, v, _ = _inputs(1, 3, 3, 2, 2, 64)
  with caplog.at_level(logging.DEBUG, logger="qwen3vl.kernels.dispatch"):
    out = kernels.attention(q, k, v)
    kernels.attention(q, k, v)  # same (shape, dtype, name): logged once
  np.testing.assert_allclose(out, kernels.attention(q, k, v, implementation="xla"), rtol=1e-6)
  chosen = [r.getMessage() for r in caplog.records if "using" in r.getMessage()]
  assert len(chosen) == 1 and "xla" in chosen[0]
  assert any("fake_kernel declined" in r.getMessage() for r in caplog.records)
  with pytest.raises(NotImplementedError):  # a forced implementation fails loudly
    kernels.attention(q, k, v, implementation="fake_kernel")
