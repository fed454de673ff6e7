"""Pallas GPU (Triton) flash attention, in interpret mode on CPU.

Values are checked against a float64 numpy dense reference and gradients (dq, dk, dv) against jax.grad of a dense
float32 jnp reference. The interpreter fills output buffers with NaN, so a block the kernel never writes fails the
value checks. Block skipping is checked by putting NaN in blocks that must be skipped: if such a block were visited,
0 * NaN would reach the output. One test lowers the kernels for CUDA (that runs on CPU too), and the GPU-only test
runs the compiled kernels.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3vl.kernels.pallas_gpu_attention import attention_bwd, pallas_gpu_attention

ON_GPU = jax.default_backend() == "gpu"


def _segments(b, length, seed):
  """Runs of odd lengths per batch row, ids 1.. and a trailing padding run with id 0."""
  rng = np.random.default_rng(seed)
  out = np.zeros((b, length), np.int32)
  for row in range(b):
    at, seg = 0, 1 + 10 * row
    while at < length - 4:
      n = int(rng.integers(3, max(4, length // 3)))
      out[row, at:at + n] = seg
      at, seg = at + n, seg + 1
    out[row, max(0, length - 3):] = 0
  return out


def _mask(b, lq, lk, causal, window, segs, layout=None, block=None):
  """[b, 1 or Hq, lq, lk] visibility; the layout (per head or shared) is expanded to tokens."""
  qpos, kpos = np.arange(lq)[:, None] + lk - lq, np.arange(lk)[None, :]
  m = np.ones((b, 1, lq, lk), bool)
  if causal:
    m &= kpos <= qpos
  if window is not None:
    m &= qpos - kpos < window
  if segs is not None:
    m &= (np.asarray(segs[0])[:, :, None] == np.asarray(segs[1])[:, None, :])[:, None]
  if layout is not None:
    lay = np.asarray(layout, bool)
    lay = lay[None] if lay.ndim == 2 else lay
    m = m & np.repeat(np.repeat(lay, block, 1), block, 2)[None, :, :lq, :lk]
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
  """float32 dense attention at highest precision, differentiable: the gradient reference."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, 2), jnp.repeat(v, g, 2)
  hi = jax.lax.Precision.HIGHEST
  s = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hi) * scale, -1e30)
  p = jax.nn.softmax(s, -1) * jnp.any(mask, -1, keepdims=True)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=hi)


def _inputs(b, lq, lk, hq, hkv, d, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(b, lq, hq, d), (b, lk, hkv, d), (b, lk, hkv, d), (b, lq, hq, d)]
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype) for s in shapes)


def _value_and_grads(fn, ct):
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct.astype(out.dtype))
  return jax.jit(run)


def _check(out, grads, q, k, v, ct, mask, scale, grad_tol=(1e-4, 2e-5)):
  """Values: error <= 2e-5 relative to the reference's largest entry; gradients: allclose to dense jnp."""
  want = _dense_np(q, k, v, mask, scale)
  out = np.asarray(out, np.float64)
  assert np.isfinite(out).all()
  empty = np.broadcast_to(~mask.any(-1), (out.shape[0], out.shape[2], out.shape[1])).transpose(0, 2, 1)
  assert (out[empty] == 0).all() and (np.asarray(grads[0])[empty] == 0).all()  # no visible key: exactly 0
  err = np.abs(out - want).max() / max(1.0, np.abs(want).max())
  assert err <= 2e-5, f"relative value error {err:.2e}"
  _, ref = _value_and_grads(lambda q, k, v: _dense_jnp(q, k, v, mask, scale), ct)(q, k, v)
  for got, exp, arg in zip(grads, ref, "qkv"):
    assert bool(jnp.isfinite(got).all()), f"d{arg} not finite"
    np.testing.assert_allclose(got, exp, rtol=grad_tol[0], atol=grad_tol[1], err_msg=f"d{arg}")
  return err


# name: (b, hq, hkv, lq, lk, d, causal, window, segments, block)
CASES = {
    "gqa_window_noncausal": (1, 4, 2, 37, 37, 64, False, 5, None, 16),
    "causal_d72_gqa4": (1, 4, 1, 50, 50, 72, True, None, None, 16),
    "causal_segments_pad_d80": (2, 2, 1, 37, 37, 80, True, None, "same", 16),
    "window_causal_d128": (1, 2, 2, 50, 50, 128, True, 11, None, 16),
    "decode_lq1_window": (1, 4, 2, 1, 37, 64, True, 8, None, 16),
    "lq_gt_lk_causal": (1, 2, 1, 20, 12, 64, True, None, None, 16),  # first 8 queries see no key
    "pair_segments_missing_id": (2, 2, 1, 20, 37, 64, False, None, "pair", 16),  # q ids 99: no key
    "len127": (1, 2, 1, 127, 127, 64, True, None, None, 32),
    "len203_window_segments": (1, 2, 2, 203, 203, 64, True, 50, "same", 32),
}


def _case_segments(b, lq, lk, kind):
  if kind is None:
    return None
  ids = _segments(b, lk, seed=lk)
  if kind == "same":
    return ids, ids
  q_ids = ids[:, :lq].copy()
  q_ids[:, 3:5] = 99  # an id no key has: those queries output 0
  return q_ids, ids


@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense(name):
  b, hq, hkv, lq, lk, d, causal, window, seg, block = CASES[name]
  q, k, v, ct = _inputs(b, lq, lk, hq, hkv, d)
  segs = _case_segments(b, lq, lk, seg)
  fn = lambda q, k, v: pallas_gpu_attention(q, k, v, causal=causal, segment_ids=segs, sliding_window=window,
                                            interpret=True, block_q=block, block_k=block)
  out, grads = _value_and_grads(fn, ct)(q, k, v)
  _check(out, grads, q, k, v, ct, _mask(b, lq, lk, causal, window, segs), d ** -0.5)


@pytest.mark.parametrize("per_head, causal, seg", [(True, True, False), (False, False, True)])
def test_block_layout(per_head, causal, seg):
  """Random layout (with one q block left fully unmarked) on top of causal or segment masks."""
  b, hq, hkv, lq, lk, d, bs = (1, 4, 2, 75, 75, 64, 16) if per_head else (2, 2, 1, 37, 45, 64, 16)
  nq, nk = -(-lq // bs), -(-lk // bs)
  rng = np.random.default_rng(3)
  layout = rng.random((hq, nq, nk) if per_head else (nq, nk)) < 0.5
  layout[..., 1, :] = False  # a q block that computes nothing: its rows must be 0
  q, k, v, ct = _inputs(b, lq, lk, hq, hkv, d, seed=4)
  segs = _case_segments(b, lq, lk, "pair" if seg else None)
  fn = lambda q, k, v: pallas_gpu_attention(q, k, v, causal=causal, segment_ids=segs, block_layout=layout,
                                            block_size=bs, interpret=True)
  out, grads = _value_and_grads(fn, ct)(q, k, v)
  _check(out, grads, q, k, v, ct, _mask(b, lq, lk, causal, None, segs, layout, bs), d ** -0.5)
  np.testing.assert_array_equal(out[:, bs:2 * bs], 0.0)


SKIP_CASES = {  # name: kwargs; in each, q blocks 2-3 never see kv block 0 and kv blocks 2-3 never see q blocks 0-1
    "window": dict(causal=True, sliding_window=8, block_q=16, block_k=16),
    "segments": dict(segment_ids=(np.repeat([[1, 2]], 32, 1),) * 2, block_q=16, block_k=16),
    "layout": dict(block_layout=np.tril(np.ones((4, 4), bool)) & ~np.tri(4, 4, -2, bool), block_size=16),
}


@pytest.mark.parametrize("name", list(SKIP_CASES))
def test_masked_blocks_are_skipped(name):
  """NaN in blocks that must be skipped: what never sees them stays finite and exact (0 * NaN would leak).

  k, v rows 0-15 and q, dout rows 0-31 are NaN. Visiting kv block 0 from q rows >= 32 would poison out and dq
  there; visiting q blocks 0-1 from kv rows >= 32 would poison dk and dv there.
  """
  kw = SKIP_CASES[name]
  q, k, v, ct = _inputs(1, 64, 64, 2, 1, 64, seed=5)
  mask = _mask(1, 64, 64, kw.get("causal", False), kw.get("sliding_window"), kw.get("segment_ids"),
               kw.get("block_layout"), kw.get("block_size"))
  _, ref = _value_and_grads(lambda q, k, v: _dense_jnp(q, k, v, mask, 0.125), ct)(q, k, v)
  poison = lambda x, rows: x.at[:, rows].set(jnp.nan)
  fn = lambda q, k, v: pallas_gpu_attention(q, k, v, interpret=True, **kw)
  out, (dq, dk, dv) = _value_and_grads(fn, poison(ct, slice(0, 32)))(
      poison(q, slice(0, 32)), poison(k, slice(0, 16)), poison(v, slice(0, 16)))
  want = _dense_np(q, k, v, mask, 0.125)
  np.testing.assert_allclose(out[:, 32:], want[:, 32:], rtol=2e-5, atol=2e-6)
  for got, exp, arg in ((dq, ref[0], "q"), (dk, ref[1], "k"), (dv, ref[2], "v")):
    np.testing.assert_allclose(got[:, 32:], exp[:, 32:], rtol=1e-4, atol=2e-5, err_msg=f"d{arg}")


def test_backward_from_saved_residuals():
  """attention_bwd (the entry other forward kernels use) from a reference out and natural-log LSE."""
  b, hq, hkv, lq, lk, d = 2, 4, 2, 20, 37, 64
  q, k, v, ct = _inputs(b, lq, lk, hq, hkv, d, seed=9)
  segs = _case_segments(b, lq, lk, "pair")
  mask = _mask(b, lq, lk, True, None, segs)
  s = np.where(mask, np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64),
                               np.repeat(np.asarray(k, np.float64), hq // hkv, 2)) * d ** -0.5, -np.inf)
  mx = s.max(-1)
  seen = np.isfinite(mx)
  mx = np.where(seen, mx, 0)
  lse = np.where(seen, mx + np.log(np.where(seen, np.exp(s - mx[..., None]).sum(-1), 1)), 0)  # 0: no key
  out = jnp.asarray(_dense_np(q, k, v, mask, d ** -0.5), jnp.float32)
  bwd = jax.jit(lambda q, k, v, out, lse, ct: attention_bwd(q, k, v, out, lse, ct, causal=True, segment_ids=segs,
                                                            interpret=True, block_q=16, block_k=16))
  grads = bwd(q, k, v, out, jnp.asarray(lse, jnp.float32), ct)
  _, ref = _value_and_grads(lambda q, k, v: _dense_jnp(q, k, v, mask, d ** -0.5), ct)(q, k, v)
  for got, exp, arg in zip(grads, ref, "qkv"):
    np.testing.assert_allclose(got, exp, rtol=1e-4, atol=2e-5, err_msg=f"d{arg}")


def test_bf16_inputs():
  b, hq, hkv, lq, lk, d = 2, 4, 2, 37, 37, 80
  q, k, v, ct = _inputs(b, lq, lk, hq, hkv, d, dtype=jnp.bfloat16, seed=6)
  segs = _case_segments(b, lq, lk, "same")
  fn = lambda q, k, v: pallas_gpu_attention(q, k, v, causal=True, segment_ids=segs, interpret=True, block_q=16,
                                            block_k=16)
  out, grads = _value_and_grads(fn, ct)(q, k, v)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  mask = _mask(b, lq, lk, True, None, segs)
  np.testing.assert_allclose(np.asarray(out, np.float32), _dense_np(q, k, v, mask, d ** -0.5), atol=3e-2)
  f32 = lambda x: x.astype(jnp.float32)
  _, ref = _value_and_grads(lambda q, k, v: _dense_jnp(q, k, v, mask, d ** -0.5), f32(ct))(f32(q), f32(k), f32(v))
  for got, exp, arg in zip(grads, ref, "qkv"):
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all()
    assert np.abs(got - exp).max() <= 0.05 * np.abs(exp).max() + 2e-2, f"d{arg}"


def test_platform_gating_and_arguments():
  q, k, v, _ = _inputs(1, 40, 40, 2, 1, 64)
  if not ON_GPU:
    with pytest.raises(NotImplementedError):
      pallas_gpu_attention(q, k, v)
  with pytest.raises(ValueError, match="block_layout shape"):
    pallas_gpu_attention(q, k, v, block_layout=np.ones((2, 2), bool), block_size=16, interpret=True)
  with pytest.raises(ValueError, match="needs block_size"):
    pallas_gpu_attention(q, k, v, block_layout=np.ones((3, 3), bool), interpret=True)
  with pytest.raises(NotImplementedError, match="powers of two"):
    pallas_gpu_attention(q, k, v, block_q=24, interpret=False)


@pytest.mark.parametrize("variant", ["causal_segments_d72_f32", "window_layout_bf16"])
def test_lowers_to_triton(variant):
  """The compiled path lowers to Triton IR (power-of-two tiles, supported primitives), no GPU needed."""
  if variant == "causal_segments_d72_f32":
    shapes, dtype, kw = (2, 203, 4, 72), jnp.float32, dict(causal=True)
    kw["segment_ids"] = (jnp.zeros((2, 203), jnp.int32),) * 2
  else:
    shapes, dtype = (1, 100, 4, 128), jnp.bfloat16
    kw = dict(sliding_window=40, block_layout=np.ones((4, 2, 2), bool), block_size=64)
  b, l, h, d = shapes
  q = jax.ShapeDtypeStruct((b, l, h, d), dtype)
  kv = jax.ShapeDtypeStruct((b, l, 1, d), dtype)

  def f(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: pallas_gpu_attention(q, k, v, interpret=False, **kw), q, k, v)
    return out, vjp(out)

  text = jax.jit(f).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("triton") >= 3  # forward, dq, dk/dv kernels


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: the compiled Triton path")
@pytest.mark.parametrize("name, dtype, layout", [
    ("causal_d72_gqa4", jnp.float32, False), ("causal_segments_pad_d80", jnp.float32, False),
    ("len203_window_segments", jnp.float32, False), ("window_causal_d128", jnp.bfloat16, False),
    ("decode_lq1_window", jnp.float32, False), ("len203_window_segments", jnp.float32, True),
])
def test_compiled_on_gpu(name, dtype, layout):
  """Default tile sizes (64) on real hardware, plus a layout at block_size 64, against the references."""
  b, hq, hkv, lq, lk, d, causal, window, seg, _ = CASES[name]
  b = 2
  q, k, v, ct = _inputs(b, lq, lk, hq, hkv, d, dtype=dtype, seed=7)
  segs = _case_segments(b, lq, lk, seg)
  kw = dict(causal=causal, segment_ids=segs, sliding_window=window)
  lay = None
  if layout:
    lay = np.random.default_rng(8).random((hq, -(-lq // 64), -(-lk // 64))) < 0.6
    kw.update(block_layout=lay, block_size=64)
  out, grads = _value_and_grads(lambda q, k, v: pallas_gpu_attention(q, k, v, **kw), ct)(q, k, v)
  mask = _mask(b, lq, lk, causal, window, segs, lay, 64)
  if dtype == jnp.float32:
    _check(out, grads, q, k, v, ct, mask, d ** -0.5, grad_tol=(2e-4, 5e-5))
  else:
    want = _dense_np(q, k, v, mask, d ** -0.5)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
