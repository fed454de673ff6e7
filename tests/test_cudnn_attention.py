"""kernels.cudnn_attention: declines cleanly where cuDNN cannot follow the contract; matches the XLA reference on GPU.

On CPU the mask translation itself is checked: the keywords it produces, fed to
``jax.nn.dot_product_attention(implementation="xla")`` (the same semantics jax gives the cuDNN call), must
reproduce ``kernels.xla_attention`` (causal, sliding window incl. its off-by-one, GQA, scale).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3vl.kernels import cudnn_attention as ca
from qwen3vl.kernels.xla_attention import xla_attention

ON_GPU = jax.default_backend() == "gpu"


def _qkv(b, lq, lk, hq, hkv, d, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(b, lq, hq, d), (b, lk, hkv, d), (b, lk, hkv, d), (b, lq, hq, d)]
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype) for s in shapes)


@pytest.mark.skipif(ON_GPU, reason="CPU behaviour")
def test_declines_off_gpu():
  q, k, v, _ = _qkv(1, 16, 16, 4, 2, 64, jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="GPU"):
    ca.cudnn_attention(q, k, v, causal=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_layout=np.ones((1, 1), bool), block_size=16), "layout"),
    (dict(interpret=True), "interpret"),
])
def test_declines_layout_and_interpret_everywhere(kwargs, match):
  q, k, v, _ = _qkv(1, 16, 16, 4, 2, 64, jnp.bfloat16)
  with pytest.raises(NotImplementedError, match=match):
    ca.cudnn_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("shapes, kwargs, match", [
    ((16, 16, 64, jnp.float32), {}, "float16/bfloat16"),
    ((16, 16, 60, jnp.bfloat16), {}, "multiple of 8"),
    ((16, 16, 64, jnp.bfloat16), dict(segment_ids=(np.ones((1, 16), np.int32),) * 2), "segment"),
    ((4, 16, 64, jnp.bfloat16), dict(causal=True), "top-left"),
    ((16, 16, 64, jnp.bfloat16), dict(sliding_window=4), "causal"),
])
def test_declines_unsupported_arguments(monkeypatch, shapes, kwargs, match):
  """Pretends to be on GPU so the argument checks (not the platform check) are what declines."""
  monkeypatch.setattr(ca.jax, "default_backend", lambda: "gpu")
  lq, lk, d, dtype = shapes
  q, k, v, _ = _qkv(1, lq, lk, 4, 2, d, dtype)
  with pytest.raises(NotImplementedError, match=match):
    ca.cudnn_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("causal, window, hkv, scale", [(False, None, 2, None), (True, None, 1, 0.1),
                                                        (True, 1, 2, None), (True, 9, 4, None)])
def test_translation_matches_reference_semantics(causal, window, hkv, scale):
  q, k, v, _ = _qkv(2, 37, 37, 4, hkv, 64)
  kw = ca.translate(q.shape, k.shape, causal, window, scale)
  got = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)
  want = xla_attention(q, k, v, causal=causal, sliding_window=window, scale=scale)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with cuDNN")
@pytest.mark.parametrize("b, lq, hq, hkv, d, causal, window", [
    (2, 128, 4, 2, 64, False, None), (2, 203, 4, 1, 128, True, None), (1, 256, 8, 2, 72, True, 33),
    (2, 37, 4, 4, 80, True, None)])
def test_gpu_matches_xla_values_and_grads(b, lq, hq, hkv, d, causal, window):
  q, k, v, ct = _qkv(b, lq, lq, hq, hkv, d, jnp.bfloat16, seed=lq)
  kw = dict(causal=causal, sliding_window=window)

  def run(fn):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
    return out, vjp(ct)

  try:
    out, grads = jax.jit(lambda q, k, v: run(ca.cudnn_attention))(q, k, v)
  except NotImplementedError as e:  # e.g. this cuDNN / GPU rejects the shape: say so, do not hide it
    pytest.skip(f"cuDNN declined: {e}")
  want, want_grads = jax.jit(lambda q, k, v: run(xla_attention))(q, k, v)
  f32 = lambda x: np.asarray(x, np.float32)
  for got, ref, arg in zip((out, *grads), (want, *want_grads), ("out", "dq", "dk", "dv")):
    assert np.isfinite(f32(got)).all(), arg
    rel = np.linalg.norm(f32(got) - f32(ref)) / np.linalg.norm(f32(ref))  # bf16: whole-tensor relative error
    assert rel < 1e-2, f"{arg}: relative error {rel:.2e}"
