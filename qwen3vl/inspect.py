"""What a forward pass did, for notebooks and debugging: the image as the vision tower saw it, where each image's
visual tokens sit in the sequence, one decoder layer's attention probabilities, and the MoE router's load.

The attention kernels are fused: no probabilities come out of them. `attention` recomputes a layer's from the
model's own modules (input norm, q/k projections, q/k norms, MRoPE) on the hidden states the forward pass fed
that layer, so they are the ones the kernel used (tests/test_inspect.py: probabilities @ v give the layer's
attention output).

    t = trace(assistant.model, ids, pixel_values=pv, image_grid_thw=grid)
    probs = attention(assistant.model, t, layer=2)  # [B, heads, L, L]
    where, (gt, gh, gw) = image_tokens(ids[0], grid, image_token_id=cfg.image_token_id)
    probs[0, :, -1, where].reshape(-1, gt, gh, gw)  # the last token's attention over the image, per head
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3vl.model import rope
from qwen3vl.model.inputs import ModelInputs, prepare_inputs
from qwen3vl.model.stack import index_stack


@dataclasses.dataclass
class Trace:
  """One forward pass (host arrays, float32 whatever the compute dtype: numpy has no bfloat16 linear algebra)."""
  inputs: ModelInputs
  positions: np.ndarray  # [3, B, L] MRoPE rows the decoder used
  logits: np.ndarray  # [B, L, vocab] float32
  layer_inputs: np.ndarray  # [layers, B, L, H]: the hidden states entering each decoder layer (DeepStack added)
  router_logits: np.ndarray | None  # [layers, B, L, experts] for MoE, else None
  hidden_dtype: str = "float32"  # what the decoder computed the hidden states in

  @property
  def embeddings(self) -> np.ndarray:
    """[B, L, H]: token embeddings with the visual features scattered in (the decoder's input)."""
    return self.layer_inputs[0]


def trace(model, input_ids, **vision) -> Trace:
  """Runs the model once on `input_ids` [B, L] (keywords as `Qwen3VL.__call__`: pixel_values, image_grid_thw,
  attention_mask, ...) and keeps every decoder layer's input and the router logits."""
  cfg = model.config
  if cfg.mod_every:  # routed layers see only some tokens: no [B, L] hidden state per layer
    raise NotImplementedError("qwen3vl.inspect does not support Mixture-of-Depths models (config.mod_every)")
  inputs, _ = prepare_inputs(cfg, input_ids, **vision)
  graphdef, state = nnx.split(model)
  logits, layer_inputs, router, positions = jax.device_get(_forward(graphdef, state, inputs))
  b, l = inputs.input_ids.shape
  router = None if router is None else np.asarray(router, np.float32).reshape(router.shape[0], b, l, -1)
  return Trace(inputs, positions, np.asarray(logits, np.float32), np.asarray(layer_inputs, np.float32), router,
               str(layer_inputs.dtype))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, inputs):
  model = nnx.merge(graphdef, state)
  x, _, positions = model.embed_inputs(inputs)
  logits, extras = model.forward(inputs, return_hidden_states=True)
  layer_inputs = jnp.concatenate([x[None], extras["hidden_states"][:-1]])  # layer n's input: layer n-1's output
  return logits, layer_inputs, extras["router_logits"], positions


def attention(model, t: Trace, layer: int) -> np.ndarray:
  """Attention probabilities [B, heads, L, L] (float32; query, key) of decoder layer `layer` in trace `t`."""
  cfg = model.config
  n = cfg.text.num_hidden_layers
  if not 0 <= layer < n:
    raise ValueError(f"layer {layer} out of range: the decoder has {n} layers")
  graphdef, state = nnx.split(index_stack(model.layers, layer // cfg.share_every))
  rotary = (cfg.text.rope_theta, tuple(cfg.text.mrope_section))
  h = jnp.asarray(t.layer_inputs[layer], t.hidden_dtype)  # back to the dtype the layer saw (exact)
  return np.asarray(_probs(graphdef, rotary, state, h, t.positions, t.inputs.segment_ids))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _probs(graphdef, rotary, state, h, positions, segment_ids):
  layer = nnx.merge(graphdef, state)
  t = layer.attn
  cos, sin = rope.mrope_cos_sin(positions, t.head_dim, *rotary, h.dtype)
  q, k, _ = t.qkv(layer.input_norm(h), cos, sin)
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)  # GQA: query head h reads kv head h // group
  scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * t.head_dim**-0.5
  length = h.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  visible = causal & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)


def image_tokens(input_ids, image_grid_thw, *, image_token_id: int, merge: int = 2,
                 image: int = 0) -> tuple[np.ndarray, tuple[int, int, int]]:
  """(sequence positions of image `image`'s visual tokens, in row-major order of its merged grid; that grid
  (t, h / merge, w / merge)) in one row of token ids [L]. Values over the positions reshape to the grid."""
  ids = np.asarray(input_ids)
  if ids.ndim != 1:
    raise ValueError(f"image_tokens takes one row of token ids [L], got shape {ids.shape}")
  grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  if not 0 <= image < len(grids):
    raise ValueError(f"image {image} out of range: {len(grids)} images")
  sizes = [t * h * w // merge**2 for t, h, w in grids.tolist()]
  where = np.flatnonzero(ids == image_token_id)
  if len(where) != sum(sizes):
    raise ValueError(f"the row holds {len(where)} image tokens but image_grid_thw {grids.tolist()} gives "
                     f"{sum(sizes)} (token merging, config.vision_token_ratio < 1, is not supported)")
  start = sum(sizes[:image])
  t, h, w = grids[image].tolist()
  return where[start:start + sizes[image]], (t, h // merge, w // merge)


def router_load(router_logits, top_k: int, mask=None) -> np.ndarray:
  """[layers, experts]: the fraction of each layer's top-k expert choices that went to each expert, over the
  tokens where `mask` ([B, L] or [tokens]) is true. router_logits: [layers, ..., experts], e.g. a Trace's."""
  logits = np.asarray(router_logits, np.float32)
  layers, experts = logits.shape[0], logits.shape[-1]
  logits = logits.reshape(layers, -1, experts)
  if mask is not None:
    logits = logits[:, np.asarray(mask, bool).reshape(-1)]
  chosen = np.argsort(-logits, axis=-1, kind="stable")[..., :top_k]  # softmax keeps the order: top-k of logits
  counts = np.stack([np.bincount(c.reshape(-1), minlength=experts) for c in chosen])
  return counts / max(chosen.shape[1] * top_k, 1)


def patch_image(pixel_values, image_grid_thw, processor, image: int = 0) -> np.ndarray:
  """Image `image` as the vision tower saw it: [H, W, 3] in [0, 1], H = h * patch_size (after the processor's
  resize), undoing its normalization and patch order (the first frame of a video grid)."""
  grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  start = int(grids[:image].prod(-1).sum())
  gt, gh, gw = grids[image].tolist()
  p, m, tp = processor.patch_size, processor.merge_size, processor.temporal_patch_size
  rows = np.asarray(pixel_values, np.float32)[start:start + gt * gh * gw]
  x = rows.reshape(gt, gh // m, gw // m, m, m, 3, tp, p, p)  # merge-window-major rows, (c, t, y, x) vectors
  frame = x[0, :, :, :, :, :, 0].transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * p, gw * p, 3)
  if processor.do_normalize:
    frame = frame * np.asarray(processor.image_std, np.float32) + np.asarray(processor.image_mean, np.float32)
  if not processor.do_rescale:
    frame = frame / 255.0
  return np.clip(frame, 0.0, 1.0)
