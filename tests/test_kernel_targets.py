"""Every attention kernel variant compiled by the real compilers: Mosaic for TPU v5e / v6e, Triton (XLA:GPU) for
H100 / B200, on compile-only devices (libtpu; the CUDA plugin). Skipped with the reason where the stacks are
absent. Compiling proves the kernels build for the chip (shapes, tiling, SMEM/VMEM); values are checked in
interpret mode in test_pallas_*_attention.py and below (x64, chunked skip tables)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3vl import kernels
from qwen3vl.kernels import pallas_tpu_attention as tpu_kernel, pallas_tpu_tables as skip_tables
from qwen3vl.kernels.xla_attention import xla_attention
from targets_util import need, one_device_mesh

# (mask, head_dim, dtype, kv heads): every mask kind meets every head dim once, dtypes and GQA alternate.
MASKS = ("causal", "segments", "window", "layout")
CASES = [(mask, d, ("bfloat16", "float32")[(i + j) % 2], (2, 4)[j % 2])
         for i, mask in enumerate(MASKS) for j, d in enumerate((64, 72, 80, 128))]
B, L, HQ, BLOCK = 2, 256, 4, 128


def _program(mask, d, dtype, hkv, impl, grad):
  dt = jnp.dtype(dtype)
  q = jax.ShapeDtypeStruct((B, L, HQ, d), dt)
  kv = jax.ShapeDtypeStruct((B, L, hkv, d), dt)
  seg = jnp.asarray(np.repeat([[1] * 100 + [2] * 156], B, 0), jnp.int32)
  layout = kernels.causal_layout(L // BLOCK, L // BLOCK)

  def attend(q, k, v):
    if mask == "layout":
      return kernels.block_sparse_attention(q, k, v, layout, block_size=BLOCK, causal=True, implementation=impl)
    kw = {"causal": mask != "segments", "segment_ids": seg if mask == "segments" else None,
          "sliding_window": 100 if mask == "window" else None}
    return kernels.attention(q, k, v, implementation=impl, **kw)

  fn = jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)) if grad else attend
  return jax.jit(fn), (q, kv, kv)


def _compile(target_name, impl, case, grad=True):
  target = need(target_name)
  fn, args = _program(*case, impl, grad)
  with jax.set_mesh(one_device_mesh(target)):
    text = fn.lower(*args).compile().as_text()
  marker = "tpu_custom_call" if impl == "pallas_tpu" else "__gpu$xla.gpu.triton"
  assert text.count(marker) >= (3 if grad else 1), f"{impl} kernels missing from the compiled {target_name} program"


@pytest.mark.parametrize("target_name", ["v5e:1", "v6e:1"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-d{c[1]}-{c[2]}-kv{c[3]}")
def test_pallas_tpu_variants_compile(target_name, case):
  _compile(target_name, "pallas_tpu", case)


@pytest.mark.parametrize("target_name", ["h100:1", "b200:1"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-d{c[1]}-{c[2]}-kv{c[3]}")
def test_pallas_gpu_variants_compile(target_name, case):
  _compile(target_name, "pallas_gpu", case)


@pytest.mark.parametrize("target_name,impl", [("v5e:1", "pallas_tpu"), ("h100:1", "pallas_gpu")])
@pytest.mark.parametrize("mask", MASKS)
def test_forward_only_kernels_compile(target_name, impl, mask):
  _compile(target_name, impl, (mask, 128, "bfloat16", 2), grad=False)


def test_jax_triton_kernel_needs_a_device():
  """jax-triton compiles its kernel through Triton while lowering, for the compute capability the CUDA runtime reports
  for device 0 of this process (jax_triton's make_cuda_target), so it cannot target a compile-only device (and is
  not installed in CI); the dispatcher must decline it there and fall to pallas_gpu, not crash. The kernel itself
  is compiled with Triton for an explicit sm_90 target in test_triton_attention."""
  target = need("h100:1")
  fn, args = _program("causal", 128, "bfloat16", 2, "triton", grad=False)
  with jax.set_mesh(one_device_mesh(target)), pytest.raises(NotImplementedError, match="jax_triton|jax-triton"):
    fn.lower(*args)
  with kernels.dispatch.recording() as calls, jax.set_mesh(one_device_mesh(target)):
    jax.jit(lambda q, k, v: kernels.attention(q, k, v, causal=True)).lower(*args)
  assert calls[0][1] == "pallas_gpu", calls


# ----------------------------------------------------------------------------- values (interpret mode, any host)

def _inputs(seed=0, lq=37, lk=37, d=32, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(2, lq, 4, d)), dtype)
  k = jnp.asarray(rng.normal(size=(2, lk, 2, d)), dtype)
  v = jnp.asarray(rng.normal(size=(2, lk, 2, d)), dtype)
  seg = jnp.asarray(np.repeat([[1] * 20 + [2] * (lk - 20)], 2, 0), jnp.int32)
  return q, k, v, seg


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_kernels_under_x64(impl):
  """With jax_enable_x64 on (as some research code runs), both kernels trace and match the XLA reference."""
  q, k, v, seg = _inputs()
  with jax.enable_x64(True):
    loss = lambda f: (lambda q, k, v: (f(q, k, v) ** 2).sum())  # noqa: E731
    ours = lambda q, k, v: kernels.attention(q, k, v, causal=True, segment_ids=seg, implementation=impl)  # noqa
    ref = lambda q, k, v: xla_attention(q, k, v, causal=True, segment_ids=(seg, seg))  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=2e-5, rtol=2e-5)
    for a, b in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal,use_segments,use_layout", [(True, True, False), (False, True, True)])
def test_tpu_kernel_splits_calls_whose_skip_tables_overflow_smem(monkeypatch, causal, use_segments, use_layout):
  """A call whose skip tables exceed SMEM_TABLE_BYTES runs as several calls over query-row chunks: the same
  values and gradients as one call (here with a tiny budget, blocks of 16 in interpret mode)."""
  q, k, v, seg = _inputs(lq=40, lk=56, d=8)
  kw = dict(causal=causal, interpret=True, block_q=16, block_k=16)
  if use_segments:
    kw["segment_ids"] = (seg[:, :40], seg)
  if use_layout:
    kw.update(block_layout=np.tril(np.ones((3, 4), bool), 1) if not causal else kernels.causal_layout(
        3, 4, block_size=16, q_len=40, kv_len=56), block_size=16)
    kw.pop("block_q"), kw.pop("block_k")
  f = lambda q, k, v: tpu_kernel.pallas_tpu_attention(q, k, v, **kw)  # noqa: E731
  whole = f(q, k, v)
  g_whole = jax.grad(lambda *a: (f(*a) ** 2).sum(), (0, 1, 2))(q, k, v)
  lists = 2 if use_segments else 1  # skip tables per (batch, head): per example with segment ids
  monkeypatch.setattr(skip_tables, "SMEM_TABLE_BYTES", 4 * lists * 4 * 2)  # one query block (of 3) per call
  assert skip_tables.blocks_per_call(lists, 3, 4, 4, 3) == 1
  split = f(q, k, v)
  g_split = jax.grad(lambda *a: (f(*a) ** 2).sum(), (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(split, whole, atol=1e-5, rtol=1e-5)
  for a, b in zip(g_split, g_whole):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_gpu_kernel_tiles_large_layout_blocks():
  """A layout of 128-token blocks runs as 64-token tiles (shared memory): values equal the XLA block-sparse
  reference on a per-head layout over a partial last block."""
  from qwen3vl.kernels.xla_block_sparse import xla_block_sparse_attention
  q, k, v, _ = _inputs(lq=300, lk=300, d=16)
  rng = np.random.default_rng(1)
  layout = rng.random((4, 3, 3)) < 0.6
  layout[:, np.arange(3), np.arange(3)] = True
  ours = kernels.block_sparse_attention(q, k, v, layout, block_size=128, causal=True, implementation="pallas_gpu")
  ref = xla_block_sparse_attention(q, k, v, block_layout=layout, block_size=128, causal=True)
  np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=2e-5)


def test_a_kernel_of_another_chip_is_refused():
  """Forcing the TPU kernel into a GPU program is an error naming both (the interpreter is only for CPU hosts)."""
  target = need("h100:1")
  fn, args = _program("causal", 128, "bfloat16", 2, "pallas_tpu", grad=False)
  with jax.set_mesh(one_device_mesh(target)), pytest.raises(ValueError, match="pallas_tpu.*tpu kernel.*gpu"):
    fn.lower(*args)
