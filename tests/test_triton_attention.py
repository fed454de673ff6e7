"""kernels.triton_attention: the Triton kernel's math on CPU (Triton interpreter), the JAX path on GPU.

Layers of checks:
* CPU, always: the module imports without triton/jax_triton, declines (NotImplementedError) off GPU, and its
  custom VJP (with the launch swapped for the XLA forward) falls back to the XLA reference's gradients.
* CPU, when ``triton`` and ``torch`` are installed: the very ``@triton.jit`` kernel the GPU path launches runs
  under ``TRITON_INTERPRET=1`` on torch CPU tensors, compared with a float64 numpy reference (values and LSE;
  NaN-poisoned outputs, NaN-poisoned k/v in blocks the kernel must skip). The interpreter must be switched on
  before triton is first imported, so it runs in one subprocess (this file run as a script) for all cases. The
  saved out/LSE then drive the Pallas GPU backward (interpret mode) against dense gradients, and the kernel is
  compiled for sm_90 with real Triton codegen (no GPU needed) to check it lowers to tensor-core code.
* GPU (``-m gpu``; skipped unless the backend is gpu and jax_triton imports): through jax_triton.triton_call,
  values, LSE and gradients against the XLA reference.
"""
import importlib.util
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

from qwen3vl.kernels import triton_attention as ta  # noqa: E402


def _segments(rows, length):
  """One row per batch element from (id, run length) pairs; the rest of the row is padding id 0."""
  out = np.zeros((len(rows), length), np.int32)
  for b, runs in enumerate(rows):
    at = 0
    for seg, n in runs:
      out[b, at:at + n] = seg
      at += n
  return out


SEG37 = _segments([[(1, 5), (2, 13), (3, 11)], [(4, 21), (5, 3)]], 37)
SEG203 = _segments([[(1, 50), (2, 70), (3, 60)], [(4, 100), (5, 3), (6, 90)]], 203)
# Query ids 7 and 0 never occur among the keys (rows with nothing visible); kv block 2 (ids 9) overlaps no query
# block's id range, so the kernel must skip it: it is poisoned with NaN.
PAIR_Q = _segments([[(1, 6), (2, 8), (7, 3)]], 20)
PAIR_KV = _segments([[(1, 16), (2, 16), (9, 16)]], 48)

# name: (b, hq, hkv, lq, lk, d, causal, window, segments, dtype, block_m, block_n, poison kv [lo, hi))
CASES = {
    "decode_len1": (2, 4, 2, 1, 37, 64, True, None, None, "float32", 16, 16, None),
    "plain_37": (2, 4, 2, 37, 37, 64, False, None, None, "float32", 16, 16, None),
    "causal_127_d72_mqa": (1, 4, 1, 127, 127, 72, True, None, None, "float32", 32, 16, None),
    "causal_seg_203_d80": (2, 4, 2, 203, 203, 80, True, None, "seg203", "float32", 32, 32, None),
    "seg_37_d128": (2, 2, 2, 37, 37, 128, False, None, "seg37", "float32", 16, 16, None),
    "window_causal_127": (1, 4, 2, 127, 127, 64, True, 11, None, "float32", 16, 16, None),
    "window_noncausal_37": (1, 2, 1, 37, 37, 64, False, 5, None, "float32", 16, 16, None),
    "decode5_window_skip": (2, 4, 2, 5, 50, 64, True, 8, None, "float32", 16, 16, (0, 32)),
    "pair_empty_rows_skip": (1, 2, 1, 20, 48, 64, False, None, "pair", "float32", 16, 16, (32, 48)),
    "fp16_causal_seg": (2, 4, 2, 37, 37, 64, True, None, "seg37", "float16", 16, 16, None),
    "bf16_gqa": (2, 4, 2, 37, 37, 64, True, None, None, "bfloat16", 16, 16, None),
}
# Triton's interpreter mis-evaluates tl.dot on bfloat16 operands (raw bits; triton 3.9 CPU): bf16 is checked on
# GPU only. float16 covers the low-precision P @ V path in the interpreter.
NOT_INTERPRETABLE = {"bf16_gqa"}
TOL = {"float32": dict(rtol=1e-5, atol=2e-6), "float16": dict(rtol=0, atol=5e-3),
       "bfloat16": dict(rtol=0, atol=3e-2)}


def _case_inputs(name, seed=0):
  """float32 numpy q, k, v (rounded through the case dtype), segment pair or None, poisoned kv range."""
  b, hq, hkv, lq, lk, d, _, _, seg, dtype, _, _, poison = CASES[name]
  rng = np.random.default_rng(seed)
  rnd = lambda *s: rng.standard_normal(s).astype(np.float32).astype(getattr(ml_dtypes, dtype, dtype)).astype(
      np.float32)
  q, k, v = rnd(b, lq, hq, d), rnd(b, lk, hkv, d), rnd(b, lk, hkv, d)
  segs = {None: None, "seg37": (SEG37, SEG37), "seg203": (SEG203, SEG203), "pair": (PAIR_Q, PAIR_KV)}[seg]
  return q, k, v, segs, poison


def _reference(q, k, v, segs, causal, window, scale):
  """float64 dense attention and LSE; rows with no visible key give 0 and LSE 0."""
  b, lq, hq, _ = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  k, v = np.repeat(k, hq // hkv, 2), np.repeat(v, hq // hkv, 2)
  qpos, kpos = np.arange(lq)[:, None] + lk - lq, np.arange(lk)[None, :]
  mask = np.ones((b, lq, lk), bool)
  if causal:
    mask &= kpos <= qpos
  if window is not None:
    mask &= qpos - kpos < window
  if segs is not None:
    mask &= segs[0][:, :, None] == segs[1][:, None, :]
  s = np.where(mask[:, None], np.einsum("bqhd,bkhd->bhqk", q, k) * scale, -np.inf)
  mx = s.max(-1, keepdims=True)
  e = np.exp(s - np.where(np.isfinite(mx), mx, 0))
  z = e.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", e / np.where(z > 0, z, 1), v)
  lse = np.where(z[..., 0] > 0, mx[..., 0] + np.log(np.where(z[..., 0] > 0, z[..., 0], 1)), 0.0)
  return out, lse, mask.any(-1)  # [B, Lq, H, D], [B, H, Lq], [B, Lq]


def _cfg(name):
  b, hq, hkv, lq, lk, d, causal, window, _, _, bm, bn, _ = CASES[name]
  return ta.make_config((b, lq, hq, d), (b, lk, hkv, d), causal=causal, sliding_window=window, block_m=bm,
                        block_n=bn)


# ----------------------------------------------------------------------------- interpreter worker (subprocess)

def _interpret_worker(out_path):
  """Runs every case through the @triton.jit kernel under TRITON_INTERPRET=1 (set by the parent)."""
  import torch
  kernel = ta.flash_fwd_kernel()
  results = {}
  for name, case in CASES.items():
    if name in NOT_INTERPRETABLE:
      continue
    dtype = getattr(torch, case[9])
    q, k, v, segs, poison = _case_inputs(name)
    if poison is not None:  # keys/values the kernel must never load: NaN would reach every output row
      k[:, poison[0]:poison[1]] = np.nan
      v[:, poison[0]:poison[1]] = np.nan
    cfg = _cfg(name)
    grid, meta = ta.launch_params(q.shape, k.shape, case[9], cfg, segs is not None)
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x)).to(dtype) for x in (q, k, v))
    if segs is None:
      seg_q = seg_k = torch.zeros(1, dtype=torch.int32)
    else:
      seg_q, seg_k = (torch.from_numpy(np.ascontiguousarray(s)) for s in segs)
    out = torch.full(q.shape, float("nan"), dtype=dtype)  # poisoned: an unwritten element stays NaN
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), dtype=torch.float32)
    kernel[grid](tq, tk, tv, seg_q, seg_k, cfg.scale, q.shape[1], k.shape[1], out, lse, **meta)
    results[name + "/out"] = out.float().numpy()
    results[name + "/lse"] = lse.numpy()
  np.savez(out_path, **results)


def _interpreter_available():
  return all(importlib.util.find_spec(m) is not None for m in ("triton", "torch"))


@pytest.fixture(scope="module")
def interpreted():
  """Outputs of all CASES from one interpreter subprocess (keyed 'name/out', 'name/lse')."""
  if not _interpreter_available():
    pytest.skip("triton and torch are needed to run the kernel under the Triton interpreter")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "out.npz")
    env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), path], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
      pytest.fail(f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    with np.load(path) as f:
      return dict(f)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_interpreted_matches_float64(interpreted, name):
  if name in NOT_INTERPRETABLE:
    pytest.skip("Triton's interpreter mis-evaluates bfloat16 tl.dot; checked on GPU")
  b, hq, hkv, lq, lk, d, causal, window, _, dtype, _, _, _ = CASES[name]
  q, k, v, segs, _ = _case_inputs(name)
  out, lse = interpreted[name + "/out"], interpreted[name + "/lse"]
  assert np.isfinite(out).all() and np.isfinite(lse).all(), "unwritten (NaN-poisoned) or poisoned-kv output"
  want, want_lse, seen = _reference(q, k, v, segs, causal, window, _cfg(name).scale)
  np.testing.assert_allclose(out, want, **TOL[dtype])
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5 if dtype == "float32" else 1e-3)
  empty = ~seen
  np.testing.assert_array_equal(out[empty], 0.0)  # rows with no visible key: exactly 0
  np.testing.assert_array_equal(lse.transpose(0, 2, 1)[empty], 0.0)
  if name == "pair_empty_rows_skip":
    assert empty.sum() == 6  # the case is meant to have empty rows (ids 7 and padding 0)


@pytest.mark.parametrize("name", ["causal_seg_203_d80", "pair_empty_rows_skip"])
def test_saved_out_and_lse_drive_the_pallas_backward(interpreted, name):
  """The residuals the kernel saves (out, LSE [B, Hq, Lq], 0 for empty rows) fed to the Pallas GPU backward (in
  interpret mode here; compiled on GPU it is what the custom VJP calls) give the dense reference's gradients."""
  pallas = pytest.importorskip("qwen3vl.kernels.pallas_gpu_attention")
  if not hasattr(pallas, "attention_bwd"):
    pytest.skip("kernels.pallas_gpu_attention has no attention_bwd")
  b, hq, hkv, lq, lk, d, causal, window, _, _, _, _, _ = CASES[name]
  q, k, v, segs, _ = _case_inputs(name, seed=0)  # the inputs the worker used (poison only hit skipped blocks)
  scale = _cfg(name).scale
  ct = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.float32)
  out, lse = jnp.asarray(interpreted[name + "/out"]), jnp.asarray(interpreted[name + "/lse"])
  kw = dict(causal=causal, segment_ids=segs, sliding_window=window, scale=scale)
  got = pallas.attention_bwd(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), out, lse, ct, interpret=True,
                             block_q=32, block_k=32, **kw)
  _, _, seen = _reference(q, k, v, segs, causal, window, scale)
  mask = np.ones((b, lq, lk), bool)
  qpos, kpos = np.arange(lq)[:, None] + lk - lq, np.arange(lk)[None, :]
  if causal:
    mask &= kpos <= qpos
  if window is not None:
    mask &= qpos - kpos < window
  if segs is not None:
    mask &= segs[0][:, :, None] == segs[1][:, None, :]

  def dense(q, k, v):
    kk, vv = jnp.repeat(k, hq // hkv, 2), jnp.repeat(v, hq // hkv, 2)
    s = jnp.where(mask[:, None], jnp.einsum("bqhd,bkhd->bhqk", q, kk) * scale, -1e30)
    p = jax.nn.softmax(s, -1) * jnp.asarray(seen)[:, None, :, None]
    return jnp.einsum("bhqk,bkhd->bqhd", p, vv)

  want = jax.vjp(dense, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))[1](ct)
  for g, w, arg in zip(got, want, "qkv"):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5, err_msg=f"d{arg}")


def test_kernel_compiles_for_sm90_with_tensor_cores():
  """Real Triton codegen (not the interpreter) down to PTX/cubin for an H100, no GPU needed: catches what the
  interpreter tolerates (constexpr branches, dynamic `if` around loop-carried values, dot shapes/precision)."""
  if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed")
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource
  q_shape, k_shape = (1, 4096, 16, 72), (1, 4096, 4, 72)
  cfg = ta.make_config(q_shape, k_shape, causal=True, sliding_window=300, dtype="bfloat16")
  _, meta = ta.launch_params(q_shape, k_shape, "bfloat16", cfg, True)
  sig = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", qseg_ptr="*i32", kseg_ptr="*i32", scale="fp32", lq="i32",
             lk="i32", o_ptr="*bf16", lse_ptr="*fp32", **{name: "constexpr" for name in meta})
  try:
    src = ASTSource(ta.flash_fwd_kernel(), sig, constexprs=dict(meta))
  except (TypeError, KeyError) as e:
    pytest.skip(f"this triton's ASTSource API differs: {e}")
  compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
  assert "mma" in compiled.asm["ptx"], "the bf16 dots did not use tensor cores"
  assert compiled.metadata.shared < 160 * 1024


# ----------------------------------------------------------------------------- CPU behaviour

def test_declines_off_gpu_without_importing_jax_triton():
  q = jnp.zeros((1, 8, 2, 64), jnp.float32)
  if jax.default_backend() == "gpu":
    pytest.skip("CPU behaviour")
  with pytest.raises(NotImplementedError, match="GPU"):
    ta.triton_attention(q, q, q)
  assert "jax_triton" not in sys.modules


def test_declines_layout_and_interpret_everywhere():
  q = jnp.zeros((1, 8, 2, 64), jnp.float32)
  with pytest.raises(NotImplementedError, match="layout"):
    ta.triton_attention(q, q, q, block_layout=np.ones((1, 1), bool), block_size=16)
  with pytest.raises(NotImplementedError, match="interpret"):
    ta.triton_attention(q, q, q, interpret=True)


def test_custom_vjp_plumbing_on_cpu(monkeypatch):
  """The custom VJP around the kernel, with the jax-triton launch swapped for the XLA forward (the only part that
  needs a GPU): its backward must fall back to the XLA reference's VJP off GPU and give its gradients,
  segment ids included (integer inputs get no cotangent)."""
  from qwen3vl.kernels.xla_attention import xla_attention
  name = "causal_seg_203_d80"
  b, hq, hkv, lq, lk, d, causal, window, _, _, _, _, _ = CASES[name]
  q, k, v, segs, _ = _case_inputs(name, seed=4)
  q, k, v = (jnp.asarray(x) for x in (q, k, v))
  segs = tuple(jnp.asarray(s) for s in segs)
  fake_lse = lambda q: jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)
  monkeypatch.setattr(ta, "_forward", lambda cfg, q, k, v, segs: (
      xla_attention(q, k, v, causal=cfg.causal, segment_ids=segs, sliding_window=cfg.window, scale=cfg.scale),
      fake_lse(q)))
  cfg = ta.make_config(q.shape, k.shape, causal=causal, sliding_window=window, scale=0.3)
  ct = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)
  got = jax.vjp(lambda q, k, v: ta._flash_vjp(cfg, q, k, v, segs), q, k, v)[1](ct)
  want = jax.vjp(lambda q, k, v: xla_attention(q, k, v, causal=causal, segment_ids=segs, scale=0.3), q, k, v)[1](ct)
  for g, w, arg in zip(got, want, "qkv"):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7, err_msg=f"d{arg}")


@pytest.mark.parametrize("d, d_pad", [(64, 64), (72, 128), (80, 128), (128, 128), (8, 16)])
def test_tiles_are_powers_of_two(d, d_pad):
  assert ta.block_sizes(1, 203, d) == (16, 64, d_pad)
  assert ta.block_sizes(4096, 37, d) == (128, 64, d_pad)


# ----------------------------------------------------------------------------- GPU (jax_triton)

def _gpu_ready():
  if jax.default_backend() != "gpu":
    return False
  try:
    ta._jax_triton()
    return True
  except NotImplementedError:
    return False


gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs a GPU backend and jax_triton")
GPU_CASES = ["plain_37", "causal_127_d72_mqa", "causal_seg_203_d80", "window_causal_127", "decode5_window_skip",
             "pair_empty_rows_skip", "bf16_gqa"]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_values_lse_and_grads_match_xla(name):
  from qwen3vl.kernels.xla_attention import xla_attention
  b, hq, hkv, lq, lk, d, causal, window, _, dtype, _, _, _ = CASES[name]
  q, k, v, segs, _ = _case_inputs(name, seed=1)
  ct = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  kw = dict(causal=causal, segment_ids=segs, sliding_window=window)

  def run(fn):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
    return out, vjp(jnp.asarray(ct, out.dtype))

  out, grads = run(ta.triton_attention)
  want, want_grads = run(xla_attention)
  f32 = lambda x: np.asarray(x, np.float32)
  if dtype == "float32":
    np.testing.assert_allclose(f32(out), f32(want), rtol=2e-5, atol=1e-5)
    for got, ref, arg in zip(grads, want_grads, "qkv"):
      np.testing.assert_allclose(f32(got), f32(ref), rtol=1e-4, atol=2e-5, err_msg=f"d{arg}")
  else:  # bf16: relative error of the whole tensor (elementwise bf16 rounding differs between kernels)
    for got, ref, arg in zip((out, *grads), (want, *want_grads), ("out", "dq", "dk", "dv")):
      assert np.isfinite(f32(got)).all(), arg
      rel = np.linalg.norm(f32(got) - f32(ref)) / np.linalg.norm(f32(ref))
      assert rel < 1e-2, f"{arg}: relative error {rel:.2e}"
  _, lse = ta.triton_attention_with_lse(q, k, v, **kw)
  _, want_lse, _ = _reference(f32(q), f32(k), f32(v), segs, causal, window, d ** -0.5)
  np.testing.assert_allclose(f32(lse), want_lse, rtol=1e-5, atol=1e-4 if dtype == "float32" else 2e-2)


@pytest.mark.gpu
@gpu
def test_gpu_through_dispatcher():
  from qwen3vl import kernels
  if "triton" not in kernels.implementations():
    pytest.skip("triton is not registered with the dispatcher")
  q, k, v, segs, _ = _case_inputs("causal_seg_203_d80", seed=3)
  out = kernels.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True, segment_ids=segs,
                          implementation="triton")
  want, _, _ = _reference(q, k, v, segs, True, None, 80 ** -0.5)
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=1e-5)


if __name__ == "__main__":  # the interpreter worker, started by the `interpreted` fixture
  _interpret_worker(sys.argv[1])
