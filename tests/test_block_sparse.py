"""Block-sparse attention (XLA implementation), layout builders, dynamic top-k layouts and the per-op dispatcher.

Values are checked against a float64 numpy dense reference under the expanded mask, gradients against jax.grad of a
dense float32 masked reference (precision highest, from conftest).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from qwen3vl import kernels
from qwen3vl.kernels import dispatch
from qwen3vl.kernels.block_sparse import block_sparse_attention, dynamic_sparse_attention
from qwen3vl.kernels.layouts import (causal_layout, dynamic_topk_layout, layout_to_lists, num_blocks, segment_layout,
                             sliding_window_layout)
from qwen3vl.kernels.xla_block_sparse import xla_block_sparse_attention


# ----------------------------------------------------------------------------- references

def _inputs(b, lq, lk, hq, hkv, d, dtype=jnp.float32, seed=0):
  """q, k, v and an output cotangent (numpy RNG: jax.random would compile per shape)."""
  rng = np.random.default_rng(seed)
  shapes = [(b, lq, hq, d), (b, lk, hkv, d), (b, lk, hkv, d), (b, lq, hq, d)]
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype) for s in shapes)


def _token_mask(b, lq, lk, causal=False, window=None, segs=None):
  """[B, Lq, Lk] token-level mask of kernels.attention (queries are the last Lq positions)."""
  qpos, kpos = np.arange(lq)[:, None] + lk - lq, np.arange(lk)[None, :]
  m = np.ones((b, lq, lk), bool)
  if causal:
    m &= kpos <= qpos
  if window is not None:
    m &= qpos - kpos < window
  if segs is not None:
    m &= np.asarray(segs[0])[:, :, None] == np.asarray(segs[1])[:, None, :]
  return m


def _expand(layout, bs, lq, lk):
  """Block layout [nq, nk] or [H, nq, nk] -> token mask [1|H, Lq, Lk]."""
  layout = np.asarray(layout)
  layout = layout[None] if layout.ndim == 2 else layout
  return np.repeat(np.repeat(layout, bs, 1), bs, 2)[:, :lq, :lk]


def _full_mask(layout, bs, b, lq, lk, **masks):
  return _token_mask(b, lq, lk, **masks)[:, None] & _expand(layout, bs, lq, lk)[None]  # [B, H|1, Lq, Lk]


def _dense_np(q, k, v, mask, scale):
  """float64 reference; mask [B, H|1, Lq, Lk]; rows with no visible key are 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, 2), np.repeat(v, g, 2)
  s = np.where(mask, np.einsum("bqhd,bkhd->bhqk", q, k) * scale, -np.inf)
  mx = s.max(-1, keepdims=True)
  e = np.exp(s - np.where(np.isfinite(mx), mx, 0))
  z = e.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", e / np.where(z > 0, z, 1), v)


def _dense_jnp(q, k, v, mask, scale):
  """float32 dense masked attention, differentiable, for gradient references."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, 2), jnp.repeat(v, g, 2)
  s = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, -1e30)
  p = jax.nn.softmax(s, -1) * jnp.any(mask, -1, keepdims=True)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _value_and_grads(fn, ct):
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct.astype(out.dtype))
  return jax.jit(run)


def _check(fn, q, k, v, ct, mask, scale, rtol=1e-5, atol=2e-6):
  """Values vs float64 dense, grads vs jax.grad of dense float32, both under ``mask``."""
  out, grads = _value_and_grads(fn, ct)(q, k, v)
  assert bool(jnp.isfinite(out).all())
  np.testing.assert_allclose(out, _dense_np(q, k, v, mask, scale), rtol=rtol, atol=atol)
  _, want = _value_and_grads(lambda q, k, v: _dense_jnp(q, k, v, jnp.asarray(mask), scale), ct)(q, k, v)
  for got, ref, arg in zip(grads, want, "qkv"):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5, err_msg=f"d{arg}")
  return out, grads


def _segments(runs, length):
  """One row per batch element from (id, run length) pairs; the rest is padding id 0."""
  out = np.zeros((len(runs), length), np.int32)
  for b, row in enumerate(runs):
    at = 0
    for seg, n in row:
      out[b, at:at + n] = seg
      at += n
  return out


# ----------------------------------------------------------------------------- random layouts

CASES = {  # name: (hq, hkv, lq, lk, bs, density, per_head, masks); "chunk": q tokens per step of the XLA loop
    "d10_shared": (4, 2, 50, 50, 16, 0.1, False, {}),
    "d50_perhead_gqa": (4, 2, 50, 50, 16, 0.5, True, {}),
    "d100_causal": (2, 1, 50, 50, 16, 1.0, False, dict(causal=True)),
    "d50_perhead_causal_mha_chunks": (2, 2, 37, 37, 8, 0.5, True, dict(causal=True, chunk=16)),
    "d30_decode_lq_ne_lk": (4, 1, 20, 45, 8, 0.3, True, dict(causal=True)),
    "d60_window_segments_chunks": (4, 2, 50, 50, 16, 0.6, False, dict(causal=True, window=19, segs="packed",
                                                                     chunk=32)),
}
SEG50 = _segments([[(1, 13), (2, 20), (3, 9)], [(4, 31), (5, 19)]], 50)


@pytest.mark.parametrize("name", list(CASES))
def test_random_layout_matches_dense(name):
  hq, hkv, lq, lk, bs, density, per_head, masks = CASES[name]
  rng = np.random.default_rng(1)
  nq, nk = num_blocks(lq, bs), num_blocks(lk, bs)
  layout = rng.random((hq, nq, nk) if per_head else (nq, nk)) < density
  masks = dict(masks)
  chunk = masks.pop("chunk", None)
  if masks.get("segs") == "packed":
    masks["segs"] = (SEG50, SEG50)
  q, k, v, ct = _inputs(2, lq, lk, hq, hkv, 64)
  mask = _full_mask(layout, bs, 2, lq, lk, **masks)
  kw = dict(block_size=bs, causal=masks.get("causal", False), segment_ids=masks.get("segs"),
            sliding_window=masks.get("window"))
  if chunk is None:
    fn = lambda q, k, v: block_sparse_attention(q, k, v, layout, **kw)
  else:  # several query chunks: the XLA implementation directly
    fn = lambda q, k, v: xla_block_sparse_attention(q, k, v, block_layout=layout, q_tokens_per_step=chunk, **kw)
  _check(fn, q, k, v, ct, mask, 64 ** -0.5)


def test_traced_layout_and_gqa8_per_head():
  """A layout traced inside jit (index lists padded to nk, run-time loop length), per-head layout with GQA 8:1."""
  q, k, v, ct = _inputs(1, 50, 50, 8, 1, 32, seed=2)
  layout = np.random.default_rng(3).random((8, 4, 4)) < 0.4
  mask = _full_mask(layout, 16, 1, 50, 50, causal=True)
  inner = jax.jit(lambda q, k, v, lay: block_sparse_attention(q, k, v, lay, block_size=16, causal=True))
  _check(lambda q, k, v: inner(q, k, v, jnp.asarray(layout)), q, k, v, ct, mask, 32 ** -0.5)


def test_rows_without_visible_key_are_zero():
  """An empty layout row, and a marked block whose keys are all in the future: zero output, finite grads."""
  q, k, v, ct = _inputs(1, 50, 50, 2, 1, 64, seed=4)
  layout = np.ones((4, 4), bool)
  layout[1] = False  # q block 1 sees nothing
  layout[0] = [False, True, True, False]  # causal: q block 0 only has future key blocks -> nothing visible
  fn = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=16, causal=True)
  out, grads = _check(fn, q, k, v, ct, _full_mask(layout, 16, 1, 50, 50, causal=True), 64 ** -0.5)
  np.testing.assert_array_equal(out[:, :32], 0.0)
  np.testing.assert_array_equal(grads[0][:, :32], 0.0)
  assert float(jnp.abs(out[:, 32:]).sum()) > 0
  empty = block_sparse_attention(q, k, v, np.zeros((4, 4), bool), block_size=16)
  np.testing.assert_array_equal(empty, 0.0)


def test_bf16_inputs():
  q, k, v, ct = _inputs(2, 50, 50, 4, 2, 64, dtype=jnp.bfloat16, seed=5)
  layout = np.random.default_rng(6).random((4, 4, 4)) < 0.5
  fn = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=16, causal=True)
  out, grads = _value_and_grads(fn, ct)(q, k, v)
  assert out.dtype == jnp.bfloat16
  want = _dense_np(q, k, v, _full_mask(layout, 16, 2, 50, 50, causal=True), 64 ** -0.5)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)
  assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g).all()) for g in grads)


# ----------------------------------------------------------------------------- builders vs their definitions

def _block_any(token_mask, bs):
  """[..., Lq, Lk] -> [..., nq, nk]: does the block pair hold any visible token pair (the ideal layout)."""
  *lead, lq, lk = token_mask.shape
  nq, nk = num_blocks(lq, bs), num_blocks(lk, bs)
  m = np.zeros((*lead, nq * bs, nk * bs), bool)
  m[..., :lq, :lk] = token_mask
  return m.reshape(*lead, nq, bs, nk, bs).any((-3, -1))


@pytest.mark.parametrize("lq, lk", [(50, 50), (20, 40)])
def test_causal_layout_is_exact_and_equals_causal_attention(lq, lk):
  bs = 16
  nq, nk = num_blocks(lq, bs), num_blocks(lk, bs)
  layout = causal_layout(nq, nk, block_size=bs, q_len=lq, kv_len=lk)
  np.testing.assert_array_equal(layout, _block_any(_token_mask(1, lq, lk, causal=True)[0], bs))
  if lq == lk:
    np.testing.assert_array_equal(causal_layout(nq, nk), layout)
  q, k, v, _ = _inputs(2, lq, lk, 4, 2, 64, seed=7)
  got = block_sparse_attention(q, k, v, layout, block_size=bs, causal=True)
  np.testing.assert_allclose(got, kernels.attention(q, k, v, causal=True), rtol=1e-5, atol=2e-6)


def test_sliding_window_layout_is_exact_and_equals_window_attention():
  bs, length, window = 8, 50, 19
  n = num_blocks(length, bs)
  layout = sliding_window_layout(n, n, -(-(window - 1) // bs) + 1)
  np.testing.assert_array_equal(layout, _block_any(_token_mask(1, length, length, True, window)[0], bs))
  assert layout.sum() < 0.6 * n * n
  q, k, v, _ = _inputs(1, length, length, 4, 2, 64, seed=8)
  got = block_sparse_attention(q, k, v, layout, block_size=bs, causal=True, sliding_window=window)
  want = kernels.attention(q, k, v, causal=True, sliding_window=window)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
  np.testing.assert_array_equal(sliding_window_layout(3, 3, 1, causal=False), np.triu(np.ones((3, 3), bool)))


def test_segment_layout_is_exact_for_any_ids():
  rng = np.random.default_rng(9)
  q_ids, kv_ids = rng.integers(0, 6, (2, 37)), rng.integers(0, 6, (2, 45))
  q_ids[:, :20], kv_ids[:, :30] = 7, 8  # some blocks share no id
  got = jax.jit(segment_layout, static_argnums=2)(q_ids, kv_ids, 8)
  want = _block_any(q_ids[:, :, None] == kv_ids[:, None, :], 8)
  assert want.shape == (2, 5, 6) and not want.all()
  np.testing.assert_array_equal(got, want)


def test_segment_layout_on_packed_segments_equals_segment_attention():
  q, k, v, ct = _inputs(2, 50, 50, 4, 2, 64, seed=10)
  layout = segment_layout(SEG50, SEG50, 8)
  assert layout.shape == (2, 7, 7) and 0.3 < float(layout.mean()) < 0.8  # block diagonal
  want = kernels.attention(q, k, v, segment_ids=jnp.asarray(SEG50))
  got = block_sparse_attention(q, k, v, layout.any(0), block_size=8, segment_ids=jnp.asarray(SEG50))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
  got_1 = block_sparse_attention(q[1:], k[1:], v[1:], layout[1], block_size=8, segment_ids=jnp.asarray(SEG50[1:]))
  np.testing.assert_allclose(got_1, want[1:], rtol=1e-5, atol=2e-6)  # one element with its own layout
  aligned = _segments([[(1, 16), (2, 24), (3, 8)]], 48)  # boundaries on blocks of 8: the layout alone is exact
  got = block_sparse_attention(q[:1, :48], k[:1, :48], v[:1, :48], segment_layout(aligned, aligned, 8)[0],
                               block_size=8)
  want = kernels.attention(q[:1, :48], k[:1, :48], v[:1, :48], segment_ids=jnp.asarray(aligned))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------- dynamic top-k layouts

def _diag(lq, lk, bs):
  nq = num_blocks(lq, bs)
  return ((lk - lq) + np.minimum((np.arange(nq) + 1) * bs, lq) - 1) // bs


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq, lk, top_k, local", [(50, 50, 1, 1), (30, 61, 2, 2)])
def test_dynamic_topk_layout_shape_diagonal_and_counts(causal, lq, lk, top_k, local):
  bs = 8
  q, k, _, _ = _inputs(2, lq, lk, 4, 2, 16, seed=11)
  layout = np.asarray(jax.jit(dynamic_topk_layout, static_argnums=(2, 3), static_argnames=("local_blocks", "causal"))(
      q, k, bs, top_k, local_blocks=local, causal=causal))
  nq, nk = num_blocks(lq, bs), num_blocks(lk, bs)
  assert layout.shape == (4, nq, nk) and layout.dtype == bool
  diag = _diag(lq, lk, bs)
  assert layout[:, np.arange(nq), diag].all()
  available = diag + 1 if causal else np.full(nq, nk)
  np.testing.assert_array_equal(layout.sum(-1), np.broadcast_to(np.minimum(top_k + local, available), (4, nq)))
  if causal:
    assert not (layout & (np.arange(nk)[None, None, :] > diag[None, :, None])).any()
  assert (layout != layout[:1]).any()  # per-head choices differ on random data


@pytest.mark.parametrize("causal", [False, True])
def test_dynamic_topk_selects_best_pooled_blocks(causal):
  """Key block j holds e_j (every token); query block i of head h holds r[h, i]: pooled score (i, j) = r[h, i, j]."""
  bs, length, top_k = 4, 30, 2  # the last block is partial (2 tokens): pooling must be a mean
  n = num_blocks(length, bs)
  r = np.random.default_rng(12).permutation(2 * n * n).reshape(2, n, n).astype(np.float32)
  k = np.repeat(np.eye(n, dtype=np.float32), bs, 0)[:length][None, :, None]  # [1, L, 1, n]
  q = np.repeat(r.transpose(1, 0, 2), bs, 0)[:length][None]  # [1, L, 2, n]
  got = np.asarray(dynamic_topk_layout(jnp.asarray(q), jnp.asarray(k), bs, top_k, causal=causal))
  want = np.zeros((2, n, n), bool)
  for h in range(2):
    for i in range(n):
      want[h, i, i] = True
      cands = [j for j in range(n) if j != i and (j < i or not causal)]
      for j in sorted(cands, key=lambda j: -r[h, i, j])[:top_k]:
        want[h, i, j] = True
  np.testing.assert_array_equal(got, want)


def test_dynamic_sparse_attention_under_jit():
  q, k, v, ct = _inputs(1, 50, 50, 4, 2, 32, seed=13)
  layout = np.asarray(dynamic_topk_layout(q, k, 8, 2, causal=True))
  fn = jax.jit(lambda q, k, v: dynamic_sparse_attention(q, k, v, block_size=8, top_k=2, causal=True))
  _check(fn, q, k, v, ct, _full_mask(layout, 8, 1, 50, 50, causal=True), 32 ** -0.5)


# ----------------------------------------------------------------------------- index lists and cost

def test_layout_to_lists_concrete_and_traced_agree():
  layout = np.array([[[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]]], bool)
  idx, counts = layout_to_lists(layout)
  assert isinstance(idx, np.ndarray) and idx.shape == (1, 3, 3)
  np.testing.assert_array_equal(counts, [[3, 0, 1]])
  np.testing.assert_array_equal(idx, [[[0, 2, 3], [0, 0, 0], [1, 1, 1]]])  # padding repeats the last marked block
  t_idx, t_counts = jax.jit(layout_to_lists)(layout)
  assert t_idx.shape == (1, 3, 4)  # traced: padded to nk
  np.testing.assert_array_equal(t_idx[..., :3], idx)
  np.testing.assert_array_equal(t_counts, counts)
  with pytest.raises(ValueError, match="max_count"):
    layout_to_lists(layout, max_count=2)


def _dot_flops(jaxpr):
  """FLOPs of every dot_general in a jaxpr, scan bodies counted once per iteration."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          total += times * _dot_flops(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          total += times * _dot_flops(sub)
  return total


def test_cost_follows_density():
  """Forward + backward matmul FLOPs at 10% density are < 1/3 of those at 100% (deterministic, from the jaxpr)."""
  q, k, v, _ = _inputs(1, 320, 320, 2, 1, 16)
  n = 20
  sparse = np.zeros((n, n), bool)
  sparse[np.arange(n), np.arange(n)] = sparse[np.arange(n), (np.arange(n) * 7 + 3) % n] = True  # <= 2 per row

  def flops(layout):
    loss = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=16).sum()
    return _dot_flops(jax.make_jaxpr(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v).jaxpr)

  dense_flops, sparse_flops = flops(np.ones((n, n), bool)), flops(sparse)
  assert sparse_flops * 3 < dense_flops, (sparse_flops, dense_flops)


# ----------------------------------------------------------------------------- dispatcher

def test_bad_layouts_raise():
  q, k, v, _ = _inputs(1, 50, 50, 4, 2, 64)
  with pytest.raises(ValueError, match=r"\(4, 4\)"):
    block_sparse_attention(q, k, v, np.ones((3, 4), bool), block_size=16)
  with pytest.raises(ValueError, match="block_layout"):
    block_sparse_attention(q, k, v, np.ones((2, 4, 4), bool), block_size=16)
  with pytest.raises(ValueError, match="block_size"):
    block_sparse_attention(q, k, v, np.ones((4, 4), bool), block_size=0)
  with pytest.raises(ValueError, match="xla"):
    block_sparse_attention(q, k, v, np.ones((4, 4), bool), block_size=16, implementation="nope")


@pytest.fixture
def registries(monkeypatch):
  # Start from the XLA reference alone, whatever kernels the package registered.
  monkeypatch.setattr(dispatch, "_REGISTRIES", {op: {"xla": r["xla"]} for op, r in dispatch._REGISTRIES.items()})
  monkeypatch.setattr(dispatch, "_LOGGED", set())


def test_platform_entries_get_interpret(registries):
  """Automatic dispatch passes interpret=None (a kernel off its platform declines); forcing a name off its platform
  passes interpret=True; forcing it on its platform passes interpret=None."""
  calls = []

  def fake_pallas(q, k, v, *, causal=False, segment_ids=None, sliding_window=None, scale=None, block_layout=None,
                  block_size=None, interpret=None):
    calls.append((block_layout is not None, interpret))
    if interpret is None and dispatch.current_platform() != "tpu":
      raise NotImplementedError("not on tpu")
    return xla_block_sparse_attention(q, k, v, block_layout=block_layout, block_size=block_size, causal=causal)

  for op in ("attention", "block_sparse_attention"):
    kernels.register_implementation("pallas_tpu", fake_pallas, op=op, platform="tpu")
  assert dispatch.implementations("block_sparse_attention") == ("pallas_tpu", "xla")
  assert dispatch.implementations() == ("pallas_tpu", "xla")
  q, k, v, _ = _inputs(1, 20, 20, 2, 1, 16)
  layout = np.tril(np.ones((2, 2), bool))
  ref = block_sparse_attention(q, k, v, layout, block_size=16, causal=True, implementation="xla")
  np.testing.assert_array_equal(block_sparse_attention(q, k, v, layout, block_size=16, causal=True), ref)
  assert calls == [(True, None)]  # declined, fell through to xla
  forced = block_sparse_attention(q, k, v, layout, block_size=16, causal=True, implementation="pallas_tpu")
  np.testing.assert_array_equal(forced, ref)
  assert calls[-1] == (True, True)
  kernels.attention(q, k, v)  # the attention op walks its own registry
  assert calls[-1] == (False, None)
  kernels.register_implementation("native", fake_pallas, op="block_sparse_attention",
                                  platform=dispatch.current_platform())
  with pytest.raises(NotImplementedError):  # forced on its own platform: compiled (interpret=None), errors raise
    block_sparse_attention(q, k, v, layout, block_size=16, implementation="native")
  assert calls[-1] == (True, None)
  with pytest.raises(ValueError, match="unknown op"):
    kernels.register_implementation("x", fake_pallas, op="moe")
