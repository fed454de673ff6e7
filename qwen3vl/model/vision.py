"""Vision tower: patch embedding, interpolated learned positions, 2-D RoPE blocks, patch merger, DeepStack.

All images and video frames of a batch are packed into one sequence of patches [N, patch_dim] in
merge-window-major order. Attention is restricted to one image / one temporal patch of a video through
segment ids (never a dense mask over the whole batch); with `vision_block_size > 0` it runs as block-sparse
attention over the per-image block layout, so compute too grows with the sum of squared image lengths. Everything that depends on the grid values (position
embedding taps, rotary coordinates, segment ids) is computed on the host by `vision_geometry`, so the
device function has static shapes. The blocks are one stacked module; DeepStack taps split the scan into
segments at `deepstack_visual_indexes` rather than carrying copies of the hidden state through it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3vl import kernels
from qwen3vl.config import ModelConfig
from qwen3vl.model import rope
from qwen3vl.model.layers import LayerNorm, Linear, param, precision_kwargs
from qwen3vl.model.remat import tag as checkpoint_tag
from qwen3vl.model.stack import build_stack, run_stack, slice_stack
from qwen3vl.sharding import constrain

PATCHES = ("batch", "act_embed")  # the packed patch rows are split like the batch (sharding.shard_batch)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VisionGeometry:
  """Per-patch host-computed inputs of the tower (all [N, ...], merge-window-major order)."""
  pos_index: np.ndarray  # [N, 4] int32: bilinear taps into the learned grid
  pos_weight: np.ndarray  # [N, 4] float32: bilinear weights
  rowcol: np.ndarray  # [N, 2] int32: full-resolution (row, col) for the 2-D RoPE
  segment_ids: np.ndarray  # [N] int32: one id per image / per temporal patch of a video, from 1


def vision_geometry(grid_thw, num_position_embeddings: int = 2304, merge: int = 2) -> VisionGeometry:
  """Host-side geometry for packed items with grids `grid_thw` [n, 3] (t, h, w in patches)."""
  grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  side = int(round(num_position_embeddings**0.5))
  taps, weights, rowcols, segments = [], [], [], []
  segment = 0
  for t, h, w in grid.tolist():
    if h % merge or w % merge:
      raise ValueError(f"vision grid (t={t}, h={h}, w={w}) is not divisible by spatial_merge_size={merge}")
    # Patch (row, col) in merge-window-major order: block row, block col, intra row, intra col.
    br, bc, ir, ic = np.meshgrid(np.arange(h // merge), np.arange(w // merge), np.arange(merge),
                                 np.arange(merge), indexing="ij")
    row = (br * merge + ir).reshape(-1)
    col = (bc * merge + ic).reshape(-1)
    ty, wy = _axis_taps(row, h, side)
    tx, wx = _axis_taps(col, w, side)
    tap = (ty[:, :, None] * side + tx[:, None, :]).reshape(-1, 4)
    weight = (wy[:, :, None] * wx[:, None, :]).reshape(-1, 4)
    for _ in range(t):  # identical for every temporal patch; each is its own attention segment
      segment += 1
      taps.append(tap)
      weights.append(weight)
      rowcols.append(np.stack([row, col], -1))
      segments.append(np.full(h * w, segment))
  if not taps:
    raise ValueError("vision_geometry needs at least one image or video grid")
  return VisionGeometry(np.concatenate(taps).astype(np.int32), np.concatenate(weights).astype(np.float32),
                        np.concatenate(rowcols).astype(np.int32), np.concatenate(segments).astype(np.int32))


def _axis_taps(index: np.ndarray, size: int, side: int):
  """Bilinear, align_corners=True taps along one axis, in float32 exactly as HF computes them."""
  src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
  floor = np.floor(src)
  offsets = np.arange(2, dtype=np.float32)
  taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
  weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets), 0).astype(np.float32)
  return taps, weights


class VisionBlock(nnx.Module):
  """Pre-norm block: x += proj(attn(rope(qkv(ln1 x)))); x += fc2(gelu_tanh(fc1(ln2 x)))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    v = cfg.vision
    kw, lin = precision_kwargs(cfg, "vision", rngs)
    d = v.hidden_size
    self.norm1 = LayerNorm(d, ("embed",), eps=v.layer_norm_eps, **kw)
    self.norm2 = LayerNorm(d, ("embed",), eps=v.layer_norm_eps, **kw)
    self.qkv = Linear(d, 3 * d, ("embed", "heads"), bias=True, tag="vision_qkv", **kw, **lin)
    self.proj = Linear(d, d, ("heads", "embed"), bias=True, tag="vision_proj", **kw, **lin)
    self.fc1 = Linear(d, v.intermediate_size, ("embed", "mlp"), bias=True, tag="vision_fc1", **kw, **lin)
    self.fc2 = Linear(v.intermediate_size, d, ("mlp", "embed"), bias=True, tag="vision_fc2", **kw, **lin)
    self.num_heads, self.attention_impl = v.num_heads, cfg.attention_impl
    self.block_size = cfg.vision_block_size

  def __call__(self, x, cos, sin, segment_ids, layout=None):
    n, d = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    # RoPE in float32, cast back (as HF's apply_rotary_pos_emb_vision).
    q = rope.apply_rope(q.astype(jnp.float32), cos, sin).astype(x.dtype)
    k = rope.apply_rope(k.astype(jnp.float32), cos, sin).astype(x.dtype)
    # One packed sequence whose rows the batch axes split: on a mesh each chip attends its own patches.
    if layout is None:
      o = kernels.attention(q[None], k[None], v[None], segment_ids=segment_ids[None],
                            implementation=self.attention_impl, sequence_sharded=True)[0]
    else:  # only the blocks that hold patches of one image are computed
      o = kernels.block_sparse_attention(q[None], k[None], v[None], layout, block_size=self.block_size,
                                         segment_ids=segment_ids[None], implementation=self.attention_impl,
                                         sequence_sharded=True)[0]
    o = checkpoint_tag(o, "vision_attention")
    x = x + self.proj(o.reshape(n, d))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=True))


class PatchMerger(nnx.Module):
  """2x2 patches -> one LLM token. Main merger: LayerNorm per patch before the concat; DeepStack mergers:
  LayerNorm over the concatenated 4D vector (`postshuffle`). Exact (erf) GELU in both."""

  def __init__(self, cfg: ModelConfig, postshuffle: bool, rngs: nnx.Rngs):
    v = cfg.vision
    kw, lin = precision_kwargs(cfg, "vision", rngs)
    wide = v.hidden_size * v.spatial_merge_size**2
    self.norm = LayerNorm(wide if postshuffle else v.hidden_size, ("embed",), eps=v.layer_norm_eps, **kw)
    self.fc1 = Linear(wide, wide, ("embed", "mlp"), bias=True, lora_name="merger", **kw, **lin)
    self.fc2 = Linear(wide, v.out_hidden_size, ("mlp", "out_embed"), bias=True, lora_name="merger", **kw,
                      **lin)
    self.postshuffle, self.wide = postshuffle, wide

  def __call__(self, x):
    x = self.norm(x.reshape(-1, self.wide)) if self.postshuffle else self.norm(x).reshape(-1, self.wide)
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    v = cfg.vision
    kw, _ = precision_kwargs(cfg, "vision", rngs)  # the patch embedding stays out of float8
    self.patch_embed = Linear(v.patch_dim, v.hidden_size, ("patch", "embed"), bias=True, **kw)
    self.pos_embed = param(rngs, (v.num_position_embeddings, v.hidden_size), (None, "embed"), cfg.param_dtype)
    self.blocks = build_stack(lambda r: VisionBlock(cfg, r), v.depth, rngs)
    self.merger = PatchMerger(cfg, postshuffle=False, rngs=rngs)
    self.deepstack_mergers = nnx.List([PatchMerger(cfg, postshuffle=True, rngs=rngs)
                                       for _ in v.deepstack_visual_indexes])
    self.cfg = v
    self.scan, self.dtype, self.block_size = cfg.scan_layers, cfg.precision_of("vision")[0], cfg.vision_block_size
    self.remat, self.remat_custom = cfg.vision_remat, cfg.remat_custom

  def __call__(self, pixels: jax.Array, geometry: VisionGeometry):
    """pixels [N, patch_dim] -> (merged [N/4, out], deepstack [levels, N/4, out])."""
    x = self.patch_embed(pixels)
    table = self.pos_embed[...]
    pos = (jnp.take(table, geometry.pos_index, axis=0) * geometry.pos_weight[..., None]).sum(1)
    x = constrain(x + pos.astype(x.dtype), PATCHES)
    cos, sin = rope.vision_cos_sin(geometry.rowcol, self.cfg.head_dim, self.cfg.rope_theta)
    layout = None
    if self.block_size:
      seg = geometry.segment_ids[None]
      layout = kernels.segment_layout(seg, seg, self.block_size)[0]

    def body(block, h, _):
      return constrain(block(h, cos, sin, geometry.segment_ids, layout), PATCHES), None

    taps, start = [], 0
    for stop in [i + 1 for i in self.cfg.deepstack_visual_indexes] + [self.cfg.depth]:
      if stop > start:
        x, _ = run_stack(slice_stack(self.blocks, start, stop), body, x, scan=self.scan, remat=self.remat,
                         remat_custom=self.remat_custom)
      taps.append(x)
      start = stop
    deepstack = [m(t) for m, t in zip(self.deepstack_mergers, taps)]
    merged = self.merger(x)
    deepstack = jnp.stack(deepstack) if deepstack else jnp.zeros((0,) + merged.shape, merged.dtype)
    return merged, deepstack
