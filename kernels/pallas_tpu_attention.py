"""Flash attention as Pallas TPU (Mosaic) kernels: forward, dq and dk/dv, with block skipping via scalar prefetch.

Why a separate TPU kernel: on TPU the XLA blockwise reference (``kernels.xla_attention``) spends its time on
masked-out blocks and on materialising per-block masks; this kernel fetches and computes only the (q block,
kv block) pairs that can have a visible key, keeps the online-softmax state in VMEM and streams k/v through the
pipeline the Pallas TPU runtime builds from the BlockSpecs.

Design notes
------------
* Layout: the wrapper moves to [batch, heads, length, head_dim] (the block's last two dims are then
  (length, head_dim), which is what Mosaic tiles), pads lengths to block multiples and head_dim to a multiple of
  128 lanes (72 -> 128, 80 -> 128; zeros do not change q.k and the padded output columns are sliced off).
  GQA: k/v keep their Hkv heads; the k/v index_map reads kv head ``h // group`` so nothing is repeated.
* Blocks: ``block_q`` / ``block_k`` default to 128 (the lane width: s = q k^T is [block_q, block_k] and its last
  dim lives on lanes). Short sequences use one block rounded up to the sublane tile (8 for f32, 16 for bf16) for
  q and to 128 for k. With ``block_layout`` both are ``block_size``. Smaller blocks (e.g. 16) are fine in
  interpret mode, which is how the CPU tests get several blocks out of 37-token sequences; compiled runs need
  block_q % 8 == 0 and block_k % 128 == 0 (or a single block) and otherwise decline with NotImplementedError.
* Per-row state (running max m, running sum l, the saved log-sum-exp, delta = rowsum(dO * O), q segment ids) is
  stored broadcast over 128 lanes ([rows, 128]) and tiled or sliced to the width needed, which avoids
  lane<->sublane relayouts; kv segment ids are stored over 8 sublanes ([8, cols]) for the same reason.
  Accumulators (acc, dq, dk, dv) are float32 VMEM scratch; matmuls take the input dtype with float32 results.
* Skipping: for every (batch, head, q block) a list of the kv blocks that can contribute, and its length, are
  scalar-prefetched into SMEM (``PrefetchScalarGridSpec``). The innermost ("arbitrary") grid axis walks that
  list: the k/v index_maps read the list, so a skipped block is never DMA'd, and ``pl.when(step < count)``
  skips the compute of the tail (the tail repeats the last listed index so the pipeline does not fetch anything
  new). The lists come from (a) the static causal / sliding-window / padding geometry (numpy, which also sets the
  grid's length to the longest list), (b) the block layout, and (c) for segment ids, per-block min/max ids,
  computed on device: blocks whose id ranges do not overlap are dropped (``kernels.pallas_tpu_tables``). A call
  whose tables would overflow SMEM (a long packed sequence) runs as several calls over query-row chunks, keys
  cut at each chunk's last visible position under causal. The dk/dv kernel uses the transposed
  lists (per kv block, the q blocks that see it) and also walks the GQA group on an arbitrary axis so each kv
  head's dk/dv is accumulated in place. A row with no visible key ends with l = 0 and writes exactly 0 (lse 0).
* Backward is a ``jax.custom_vjp``: the forward saves the log-sum-exp ([B, H, Lq] float32); dq and dk/dv are
  separate kernels that recompute p = exp(s - lse) (no atomics: each output block is owned by one grid row).
* Platform gating: ``interpret=None`` runs compiled only when the target is a TPU (``kernels.target``: the mesh's
  devices, else the default backend) or ``pltpu.force_tpu_interpret_mode`` is active, and otherwise raises
  NotImplementedError so the dispatcher falls through. ``interpret=True`` (or an ``pltpu.InterpretParams``) runs
  the TPU interpreter on any platform; it fills unwritten buffers with NaN, so an output block the kernel forgets
  to write shows up in tests.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwen3vl.kernels import pallas_tpu_tables as skip_tables, target

F32 = jnp.float32
NEG_INF = -float("inf")
LANES = 128
SUBLANES = 8
NT = (((1,), (1,)), ((), ()))  # a @ b.T without materialising the transpose
PLATFORM = "tpu"


class _Cfg(NamedTuple):
  """Static settings of one call (hashable: it keys the jit cache)."""
  causal: bool
  window: Optional[int]
  scale: float
  bq: int
  bk: int
  lq: int  # unpadded lengths
  lk: int
  lq_pad: int
  lk_pad: int
  group: int  # Hq // Hkv
  bt: int  # batch extent of the skip tables (1, or B when segment ids make them per-example)
  ht: int  # head extent of the skip tables (1, or Hq for a per-head layout)
  fwd_steps: int  # length of the innermost grid axis of the forward / dq kernels
  bwd_steps: int  # ... of the dk/dv kernel
  interpret: object  # None (compiled) or pltpu.InterpretParams


def pallas_tpu_attention(q, k, v, *, causal=False, segment_ids=None, sliding_window=None, scale=None,
                         block_layout=None, block_size=None, interpret=None, block_q=128, block_k=128):
  """Flash attention on TPU; arguments as ``kernels.attention`` plus the Pallas-backend contract.

  Args:
    q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] (Hkv divides Hq).
    segment_ids: None or a (q_ids [B, Lq], kv_ids [B, Lk]) pair (a single [B, L] array is accepted too).
    block_layout: None or bool [nq, nk] / [Hq, nq, nk] over blocks of ``block_size`` tokens; only marked blocks
      are computed (on top of the other masks). A concrete (numpy) layout also shortens the grid.
    interpret: None (compiled on TPU, NotImplementedError elsewhere), True / InterpretParams (TPU interpreter,
      any platform), False (compiled; fails off TPU).
    block_q, block_k: block sizes along the lengths when there is no layout.

  Returns [B, Lq, Hq, D] in q.dtype.
  """
  params = _interpret_params(interpret)
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  if sliding_window is not None and int(sliding_window) <= 0:
    raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
  if block_layout is not None:
    if block_size is None:
      raise ValueError("block_layout needs block_size")
    bq = bk = int(block_size)
  else:
    sub = SUBLANES * max(1, 4 // jnp.dtype(q.dtype).itemsize)
    bq = min(int(block_q), _round_up(lq, sub))
    bk = min(int(block_k), _round_up(lk, LANES))
  if bq <= 0 or bk <= 0:
    raise ValueError(f"block sizes must be positive, got {bq}, {bk}")
  lq_pad, lk_pad = _round_up(lq, bq), _round_up(lk, bk)
  nq, nk = lq_pad // bq, lk_pad // bk
  if params is None and (bq % SUBLANES or (bk % LANES and nk > 1)):
    raise NotImplementedError(f"Mosaic needs block_q % {SUBLANES} == 0 and block_k % {LANES} == 0; "
                              f"got {bq}, {bk}")
  window = None if sliding_window is None else int(sliding_window)
  scale = float(d ** -0.5 if scale is None else scale)

  vis = skip_tables.static_visibility(causal, window, bq, bk, lq, lk, nq, nk)  # [nq, nk] numpy
  layout_dyn = None
  if block_layout is not None:
    try:
      layout = np.asarray(block_layout, bool)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      layout, layout_dyn = None, jnp.asarray(block_layout, bool)
    shape = tuple((layout if layout is not None else layout_dyn).shape)
    if shape[-2:] != (nq, nk) or len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != hq):
      raise ValueError(f"block_layout shape {shape} must be ({nq}, {nk}) or ({hq}, {nq}, {nk}) for lengths "
                       f"{lq}, {lk} and block_size {bq}")
    if layout is not None:
      vis = vis[None] & (layout if layout.ndim == 3 else layout[None])
  vis = vis if vis.ndim == 3 else vis[None]  # [Ht, nq, nk]
  ht = vis.shape[0] if layout_dyn is None or layout_dyn.ndim == 2 else hq
  # The grid's inner length is the longest list the static geometry allows; dynamic masks only shorten lists.
  fwd_steps = max(1, int(vis.sum(-1).max()))
  bwd_steps = max(1, int(vis.sum(-2).max()))

  segs = None
  if segment_ids is not None:
    pair = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
    segs = tuple(jnp.asarray(s, jnp.int32) for s in pair)
  bt = b if segs else 1
  rows = skip_tables.blocks_per_call(bt * ht, nq, nk, fwd_steps, bwd_steps)
  if rows < nq:
    return _in_row_chunks(rows * bq, q, k, v, causal=causal, segs=segs, sliding_window=window, scale=scale,
                          block_layout=block_layout, block_size=block_size, interpret=interpret, bq=bq, bk=bk)
  cfg = _Cfg(bool(causal), window, scale, bq, bk, lq, lk, lq_pad, lk_pad, hq // hkv, bt, ht,
             fwd_steps, bwd_steps, params)
  return _attention_jit(cfg, q, k, v, segs, vis, layout_dyn)


def _in_row_chunks(rows, q, k, v, *, causal, segs, sliding_window, scale, block_layout, block_size, interpret, bq,
                   bk):
  """The call as several calls over `rows` query rows each (see skip_tables.blocks_per_call), outputs concatenated.

  Query row r sits at position r + Lk - Lq; a chunk [r0, r1) keeps that by taking the keys up to Lk - Lq + r1
  under causal (the later ones are invisible to it anyway), the layout's rows of its blocks and their columns.
  """
  lq, lk = q.shape[1], k.shape[1]
  outs = []
  for r0 in range(0, lq, rows):
    r1 = min(r0 + rows, lq)
    kv_end = lk - lq + r1 if causal else lk
    if kv_end <= 0:  # these queries see no key
      outs.append(jnp.zeros_like(q[:, r0:r1]))
      continue
    part = {}
    if segs is not None:
      part["segment_ids"] = (segs[0][:, r0:r1], segs[1][:, :kv_end])
    if block_layout is not None:
      i0, i1, j1 = r0 // block_size, -(-r1 // block_size), -(-kv_end // block_size)
      part.update(block_layout=block_layout[..., i0:i1, :j1], block_size=block_size)
    outs.append(pallas_tpu_attention(q[:, r0:r1], k[:, :kv_end], v[:, :kv_end], causal=causal,
                                     sliding_window=sliding_window, scale=scale, interpret=interpret, block_q=bq,
                                     block_k=bk, **part))
  return jnp.concatenate(outs, axis=1)


def _interpret_params(interpret):
  """None -> compiled (TPU only, else NotImplementedError); True -> TPU interpreter; InterpretParams as given."""
  if interpret is None:
    forced = _forced_interpret()
    if forced is not None:
      return forced
    if target.target_platform() != PLATFORM:
      raise NotImplementedError(f"Pallas TPU attention needs a TPU target (it is {target.target_platform()}); "
                                "pass interpret=True to run the interpreter")
    return None
  if interpret is True:
    return pltpu.InterpretParams()
  if interpret is False:
    return None
  if isinstance(interpret, pltpu.InterpretParams):
    return interpret
  raise ValueError(f"interpret must be None, a bool or pltpu.InterpretParams, got {interpret!r}")


def _forced_interpret():
  """The params of an active ``pltpu.force_tpu_interpret_mode`` context, else None (private config; guarded)."""
  try:
    from jax._src import config as jax_config
    return jax_config.pallas_tpu_interpret_mode_context_manager.value
  except Exception:  # pragma: no cover - older/newer jax without that flag
    return None


def _round_up(x, m):
  return -(-x // m) * m


# ----------------------------------------------------------------------------- in-kernel helpers

def _dot_general(a, b, dims):
  """float32-accumulating matmul with the precision pinned by the operand dtype: Mosaic rejects bfloat16
  operands at fp32 contract precision, which a global `jax_default_matmul_precision="highest"` would ask for."""
  precision = lax.Precision.HIGHEST if a.dtype == F32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, preferred_element_type=F32, precision=precision)


def _dot(a, b):
  return _dot_general(a, b, (((1,), (0,)), ((), ())))


def _lanes_to(x, n):
  """[rows, 128] (all lanes equal) -> [rows, n]: slice for n <= 128, tile for multiples of 128."""
  if n <= LANES:
    return x[:, :n]
  if n % LANES == 0:
    return jnp.tile(x, (1, n // LANES))
  return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _mask(cfg, qi, kj, qid_ref, kid_ref):
  """[bq, bk] visibility of block (qi, kj), or None when nothing can be masked in any block."""
  shape = (cfg.bq, cfg.bk)
  row = lax.broadcasted_iota(jnp.int32, shape, 0) + qi * cfg.bq
  col = lax.broadcasted_iota(jnp.int32, shape, 1) + kj * cfg.bk
  qpos = row + (cfg.lk - cfg.lq)
  mask = None

  def both(a, b):
    return b if a is None else a & b

  if cfg.lq_pad != cfg.lq:
    mask = both(mask, row < cfg.lq)
  if cfg.lk_pad != cfg.lk:
    mask = both(mask, col < cfg.lk)
  if cfg.causal:
    mask = both(mask, col <= qpos)
  if cfg.window is not None:
    mask = both(mask, qpos - col < cfg.window)
  if qid_ref is not None:
    qid = _lanes_to(qid_ref[0], cfg.bk)  # [bq, bk]
    kid = kid_ref[0][:1, :]  # [1, bk]
    mask = both(mask, qid == kid)
  return mask


def _scores(cfg, q, k, qi, kj, qid_ref, kid_ref):
  """Scaled float32 scores [bq, bk] with -inf where masked."""
  s = _dot_general(q, k, NT) * cfg.scale
  mask = _mask(cfg, qi, kj, qid_ref, kid_ref)
  return s if mask is None else jnp.where(mask, s, NEG_INF)


def _split_refs(refs, n_in, has_segs):
  """(inputs, segment refs or (None, None), outputs and scratch)."""
  ins, rest = refs[:n_in], refs[n_in:]
  if has_segs:
    return ins, rest[:2], rest[2:]
  return ins, (None, None), rest


# ----------------------------------------------------------------------------- forward kernel

def _fwd_kernel(fidx_ref, fcnt_ref, *refs, cfg, has_segs, with_lse):
  (q_ref, k_ref, v_ref), (qid_ref, kid_ref), rest = _split_refs(refs, 3, has_segs)
  (o_ref, lse_ref), (m_scr, l_scr, acc_scr) = (rest[:2] if with_lse else (rest[0], None)), rest[-3:]
  b, h, qi, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = skip_tables.row(cfg, b, h, qi, cfg.lq_pad // cfg.bq)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG_INF, F32)
    l_scr[...] = jnp.zeros(l_scr.shape, F32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

  @pl.when(j < fcnt_ref[row])
  def _step():
    kj = fidx_ref[row * cfg.fwd_steps + j]
    v = v_ref[0, 0]
    s = _scores(cfg, q_ref[0, 0], k_ref[0, 0], qi, kj, qid_ref, kid_ref)
    m_prev = m_scr[...]  # [bq, 128]
    m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    m_safe = jnp.where(m_next == NEG_INF, 0.0, m_next)  # nothing visible yet: keep exp(-inf) = 0, not NaN
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - _lanes_to(m_safe, cfg.bk))
    l_scr[...] = alpha * l_scr[...] + p.sum(axis=1, keepdims=True)
    m_scr[...] = m_next
    pv = _dot(p.astype(v.dtype), v)
    acc_scr[...] = acc_scr[...] * _lanes_to(alpha, acc_scr.shape[1]) + pv

  @pl.when(j == cfg.fwd_steps - 1)
  def _finish():
    l = l_scr[...]
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[0, 0] = (acc_scr[...] / _lanes_to(l_safe, acc_scr.shape[1])).astype(o_ref.dtype)
    if with_lse:
      lse_ref[0, 0] = jnp.where(seen, m_scr[...] + jnp.log(l_safe), 0.0)


def _seg_specs(cfg, q_block_of, k_block_of):
  """BlockSpecs for lane-broadcast q ids [B, Lq, 128] and sublane-broadcast kv ids [B, 8, Lk]."""
  return [pl.BlockSpec((1, cfg.bq, LANES), lambda *a: (a[0], q_block_of(*a), 0)),
          pl.BlockSpec((1, SUBLANES, cfg.bk), lambda *a: (a[0], 0, k_block_of(*a)))]


def _compiler_params(cfg, n_parallel, n_arbitrary):
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def _forward_call(cfg, q, k, v, seg_arrays, fidx, fcnt, with_lse):
  """q [B, Hq, Lq_pad, Dp], k/v [B, Hkv, Lk_pad, Dp] -> (o like q, lse [B, Hq, Lq_pad] float32 or None).

  The lse is a lane-broadcast [.., 128] output (what Mosaic stores without relayouts), so it is only emitted
  when a backward pass will need it.
  """
  bsz, hq, _, dp = q.shape
  nq = cfg.lq_pad // cfg.bq

  def kv_block(b, h, i, j, fidx_ref, fcnt_ref):
    return fidx_ref[skip_tables.row(cfg, b, h, i, nq) * cfg.fwd_steps + j]

  q_map = lambda b, h, i, j, *_: (b, h, i, 0)
  kv_map = lambda b, h, i, j, *refs: (b, h // cfg.group, kv_block(b, h, i, j, *refs), 0)
  in_specs = [pl.BlockSpec((1, 1, cfg.bq, dp), q_map),
              pl.BlockSpec((1, 1, cfg.bk, dp), kv_map),
              pl.BlockSpec((1, 1, cfg.bk, dp), kv_map)]
  if seg_arrays is not None:
    in_specs += _seg_specs(cfg, lambda b, h, i, j, *r: i, kv_block)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(bsz, hq, nq, cfg.fwd_steps),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((1, 1, cfg.bq, dp), q_map), pl.BlockSpec((1, 1, cfg.bq, LANES), q_map)][
          :2 if with_lse else 1],
      scratch_shapes=[pltpu.VMEM((cfg.bq, LANES), F32), pltpu.VMEM((cfg.bq, LANES), F32),
                      pltpu.VMEM((cfg.bq, dp), F32)])
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, has_segs=seg_arrays is not None, with_lse=with_lse),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((bsz, hq, cfg.lq_pad, LANES), F32)][:2 if with_lse else 1],
      compiler_params=_compiler_params(cfg, 3, 1),
      interpret=cfg.interpret,
      name="pallas_tpu_flash_fwd",
  )(fidx, fcnt, q, k, v, *(seg_arrays or ()))
  return outs[0], (outs[1][..., 0] if with_lse else None)


# ----------------------------------------------------------------------------- backward kernels

def _dq_kernel(fidx_ref, fcnt_ref, *refs, cfg, has_segs):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), (qid_ref, kid_ref), (dq_ref, dq_scr) = _split_refs(
      refs, 6, has_segs)
  b, h, qi, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = skip_tables.row(cfg, b, h, qi, cfg.lq_pad // cfg.bq)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, F32)

  @pl.when(j < fcnt_ref[row])
  def _step():
    kj = fidx_ref[row * cfg.fwd_steps + j]
    k = k_ref[0, 0]
    do = do_ref[0, 0]
    s = _scores(cfg, q_ref[0, 0], k, qi, kj, qid_ref, kid_ref)
    p = jnp.exp(s - _lanes_to(lse_ref[0, 0], cfg.bk))
    dp = _dot_general(do, v_ref[0, 0], NT)
    ds = p * (dp - _lanes_to(di_ref[0, 0], cfg.bk))
    dq_scr[...] += _dot(ds.astype(k.dtype), k)

  @pl.when(j == cfg.fwd_steps - 1)
  def _finish():
    dq_ref[0, 0] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(bidx_ref, bcnt_ref, *refs, cfg, has_segs):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), (qid_ref, kid_ref), (dk_ref, dv_ref, dk_scr, dv_scr) = (
      _split_refs(refs, 6, has_segs))
  b, hk, kj, g, i = (pl.program_id(n) for n in range(5))
  h = hk * cfg.group + g
  row = skip_tables.row(cfg, b, h, kj, cfg.lk_pad // cfg.bk)

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, F32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, F32)

  @pl.when(i < bcnt_ref[row])
  def _step():
    qi = bidx_ref[row * cfg.bwd_steps + i]
    q = q_ref[0, 0]
    do = do_ref[0, 0]
    v = v_ref[0, 0]
    s = _scores(cfg, q, k_ref[0, 0], qi, kj, qid_ref, kid_ref)  # [bq, bk]
    p = jnp.exp(s - _lanes_to(lse_ref[0, 0], cfg.bk))
    dv_scr[...] += _dot(p.T.astype(do.dtype), do)
    dp = _dot_general(do, v, NT)
    ds = p * (dp - _lanes_to(di_ref[0, 0], cfg.bk))
    dk_scr[...] += _dot(ds.T.astype(q.dtype), q)

  @pl.when((g == cfg.group - 1) & (i == cfg.bwd_steps - 1))
  def _finish():
    dk_ref[0, 0] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[0, 0] = dv_scr[...].astype(dv_ref.dtype)


def _backward_calls(cfg, q, k, v, do, lse, delta, seg_arrays, tables):
  """Padded [B, H, L, Dp] operands -> (dq, dk, dv) in the same layout."""
  fidx, fcnt, bidx, bcnt = tables
  bsz, hq, _, dp = q.shape
  hkv = k.shape[1]
  nq, nk = cfg.lq_pad // cfg.bq, cfg.lk_pad // cfg.bk
  lanes = lambda x: jnp.broadcast_to(x[..., None], x.shape + (LANES,))
  lse_l, delta_l = lanes(lse), lanes(delta)
  has_segs = seg_arrays is not None

  # dq: same grid and lists as the forward.
  def kv_block(b, h, i, j, fidx_ref, fcnt_ref):
    return fidx_ref[skip_tables.row(cfg, b, h, i, nq) * cfg.fwd_steps + j]

  q_map = lambda b, h, i, j, *_: (b, h, i, 0)
  kv_map = lambda b, h, i, j, *refs: (b, h // cfg.group, kv_block(b, h, i, j, *refs), 0)
  q_spec, kv_spec = pl.BlockSpec((1, 1, cfg.bq, dp), q_map), pl.BlockSpec((1, 1, cfg.bk, dp), kv_map)
  row_spec = pl.BlockSpec((1, 1, cfg.bq, LANES), q_map)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  if has_segs:
    in_specs += _seg_specs(cfg, lambda b, h, i, j, *r: i, kv_block)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, has_segs=has_segs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(bsz, hq, nq, cfg.fwd_steps), in_specs=in_specs,
          out_specs=pl.BlockSpec((1, 1, cfg.bq, dp), q_map),
          scratch_shapes=[pltpu.VMEM((cfg.bq, dp), F32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(cfg, 3, 1),
      interpret=cfg.interpret,
      name="pallas_tpu_flash_dq",
  )(fidx, fcnt, q, k, v, do, lse_l, delta_l, *(seg_arrays or ()))

  # dk/dv: grid (batch, kv head, kv block, group member, listed q block); the last two axes accumulate.
  def q_block(b, hk, j, g, i, bidx_ref, bcnt_ref):
    return bidx_ref[skip_tables.row(cfg, b, hk * cfg.group + g, j, nk) * cfg.bwd_steps + i]

  qh_map = lambda b, hk, j, g, i, *refs: (b, hk * cfg.group + g, q_block(b, hk, j, g, i, *refs), 0)
  k_map = lambda b, hk, j, g, i, *_: (b, hk, j, 0)
  q_spec, kv_spec = pl.BlockSpec((1, 1, cfg.bq, dp), qh_map), pl.BlockSpec((1, 1, cfg.bk, dp), k_map)
  row_spec = pl.BlockSpec((1, 1, cfg.bq, LANES), qh_map)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  if has_segs:
    in_specs += _seg_specs(cfg, q_block, lambda b, hk, j, *r: j)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, has_segs=has_segs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(bsz, hkv, nk, cfg.group, cfg.bwd_steps), in_specs=in_specs,
          out_specs=[pl.BlockSpec((1, 1, cfg.bk, dp), k_map), pl.BlockSpec((1, 1, cfg.bk, dp), k_map)],
          scratch_shapes=[pltpu.VMEM((cfg.bk, dp), F32), pltpu.VMEM((cfg.bk, dp), F32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(cfg, 3, 2),
      interpret=cfg.interpret,
      name="pallas_tpu_flash_dkv",
  )(bidx, bcnt, q, k, v, do, lse_l, delta_l, *(seg_arrays or ()))
  return dq, dk, dv


# ----------------------------------------------------------------------------- custom VJP and wrapper

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, seg_arrays, tables):
  return _forward_call(cfg, q, k, v, seg_arrays, tables[0], tables[1], with_lse=False)[0]


def _core_fwd(cfg, q, k, v, seg_arrays, tables):
  o, lse = _forward_call(cfg, q, k, v, seg_arrays, tables[0], tables[1], with_lse=True)
  return o, (q, k, v, o, lse, seg_arrays, tables)


def _core_bwd(cfg, res, do):
  q, k, v, o, lse, seg_arrays, tables = res
  delta = jnp.einsum("bhld,bhld->bhl", do.astype(F32), o.astype(F32))  # rowsum(dO * O)
  dq, dk, dv = _backward_calls(cfg, q, k, v, do, lse, delta, seg_arrays, tables)
  return dq, dk, dv, None, None


_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.jit, static_argnums=0)
def _attention_jit(cfg, q, k, v, segs, vis, layout_dyn):
  """Pads / transposes to the kernel layout, builds the skip lists, runs the custom-VJP core, undoes the layout."""
  d = q.shape[-1]
  dp = _round_up(d, LANES)

  def to_kernel(x, padded):
    x = jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, dp - d)))
    return jnp.swapaxes(x, 1, 2)  # [B, H, L_pad, Dp]

  qk, kk, vk = to_kernel(q, cfg.lq_pad), to_kernel(k, cfg.lk_pad), to_kernel(v, cfg.lk_pad)
  seg_arrays = None
  if segs is not None:
    qid = jnp.pad(segs[0], ((0, 0), (0, cfg.lq_pad - cfg.lq)))
    kid = jnp.pad(segs[1], ((0, 0), (0, cfg.lk_pad - cfg.lk)))
    seg_arrays = (jnp.broadcast_to(qid[:, :, None], qid.shape + (LANES,)),
                  jnp.broadcast_to(kid[:, None, :], (kid.shape[0], SUBLANES, kid.shape[1])))
  tables = skip_tables.tables(cfg, segs, vis, layout_dyn)
  out = _core(cfg, qk, kk, vk, seg_arrays, tables)
  return jnp.swapaxes(out, 1, 2)[:, :cfg.lq, :, :d]
