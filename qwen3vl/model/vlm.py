"""The full Qwen3-VL model: vision tower, token embedding with visual features, scanned decoder, LM head.

`forward(inputs)` is the pure device function (jit it over `nnx.split` state); `__call__` is the convenience
entry for notebooks: it prepares the inputs on the host and runs a compiled forward.

DeepStack inside the scan: the per-level visual features are scattered once into a dense [levels, B, L, H]
tensor (zeros at text positions) that the scanned body indexes with the layer number; after layer i < levels
it adds level i. Adding exact zeros elsewhere keeps the numbers identical to HF's masked add.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3vl.config import ModelConfig
from qwen3vl.sharding import constrain
from qwen3vl.model import rope
from qwen3vl.model.inputs import ModelInputs, prepare_inputs
from qwen3vl.model.kv_cache import KVCache
from qwen3vl.model.layers import Embed, Linear, RMSNorm
from qwen3vl.model.stack import build_stack, run_stack
from qwen3vl.model.text import DecoderLayer
from qwen3vl.model.vision import VisionTower


HIDDEN = ("batch", "length", "act_embed")  # logical axes of the decoder's hidden states (see sharding.py)


class Qwen3VL(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    t, kw = cfg.text, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.visual = VisionTower(cfg, rngs)
    head_dtype, head_fp8 = cfg.precision_of("head")
    self.embed = Embed(t.vocab_size, t.hidden_size, head_dtype=head_dtype, head_fp8=head_fp8, **kw)
    self.layers = build_stack(lambda r: DecoderLayer(cfg, r), t.num_hidden_layers // cfg.share_every, rngs)
    self.norm = RMSNorm(t.hidden_size, ("embed",), eps=t.rms_norm_eps, **kw)
    self.lm_head = None if cfg.tie_word_embeddings else Linear(
        t.hidden_size, t.vocab_size, ("embed", "vocab"), bias=False, fp8=head_fp8,
        **dict(kw, dtype=head_dtype))
    self.config = cfg

  # ------------------------------------------------------------------------------------------- device side
  def embed_inputs(self, inputs: ModelInputs):
    """Token embeddings with visual features scattered in, and the dense DeepStack tensor (or None)."""
    x = self.embed(inputs.input_ids)
    if inputs.pixel_values is None:
      return x, None
    merged, deepstack = self.visual(inputs.pixel_values, inputs.vision)
    ds = jnp.zeros((deepstack.shape[0],) + x.shape, x.dtype)
    visual = (inputs.visual_rows >= 0)[..., None]  # rows computed on the host (inputs.visual_rows)
    row = jnp.clip(inputs.visual_rows, 0, merged.shape[0] - 1)
    x = jnp.where(visual, merged[row].astype(x.dtype), x)
    ds = jnp.where(visual[None], deepstack[:, row].astype(x.dtype), ds)
    return x, ds

  def forward(self, inputs: ModelInputs, *, return_hidden_states: bool = False, return_hidden: bool = False):
    """Logits [B, L, vocab] (float32) plus extras: router logits [layers, B*L, E] for MoE, per-layer hidden
    states. `return_hidden` returns the final-normed hidden states instead of logits (for a chunked loss)."""
    cfg = self.config
    x, deepstack = self.embed_inputs(inputs)
    x = constrain(x, HIDDEN)
    cos, sin = self._rope(inputs.positions, x.dtype)

    def body(layer, h, group):
      outs = []
      for n in self._layer_numbers(group):
        h, router_logits, _ = layer(h, cos, sin, inputs.segment_ids)
        h = constrain(_add_deepstack(h, deepstack, n), HIDDEN)
        outs.append((router_logits, h if return_hidden_states else None))
      return h, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    x, per_layer = run_stack(self.layers, body, x, self._groups(), scan=cfg.scan_layers, remat=cfg.remat,
                             remat_custom=cfg.remat_custom)
    router_logits, hidden = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), per_layer)  # [layers, ...]
    x = self.norm(x)
    extras = {"router_logits": router_logits}
    if return_hidden_states:
      extras["hidden_states"] = hidden
    if return_hidden:
      return x, extras
    return self.logits(x), extras

  def _groups(self):
    """xs of the layer scan: one entry per stored weight group (= per layer without sharing)."""
    return jnp.arange(self.config.text.num_hidden_layers // self.config.share_every)

  def _layer_numbers(self, group):
    """The decoder layers a weight group runs, in order (DeepStack and the KV cache count these)."""
    k = self.config.share_every
    return [group * k + j for j in range(k)]

  def _rope(self, positions, dtype):
    t = self.config.text
    return rope.mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section, dtype)

  def logits(self, x):
    """Final-normed hidden states -> float32 logits (tied embedding or LM head)."""
    logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
    return constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab")[-logits.ndim:])

  # ------------------------------------------------------------------------------------- generation (device)
  def new_cache(self, batch: int, size: int, kv_dtype: str = "auto") -> KVCache:
    """An empty KV cache of `size` slots for every decoder layer (see `kv_cache.KVCache.empty`)."""
    t = self.config.text
    return KVCache.empty(t.num_hidden_layers, batch, size, t.num_key_value_heads, t.head_dim, self.config.dtype,
                         kv_dtype)

  def prefill(self, inputs: ModelInputs, cache: KVCache):
    """A left-padded prompt [B, L] written at cache slots 0..L-1 (attention within the prompt, through
    `kernels.attention`). Returns (last-position logits [B, V], updated cache)."""
    return self._run_cached(inputs, cache, 0, None)[:2]

  def extend(self, inputs: ModelInputs, cache: KVCache, index, mask, *, return_depth: bool = False):
    """Tokens [B, T] (a decode step, or a later chunk of a conversation, images allowed) written at cache slots
    index..index+T-1 (`index` may be traced); mask [B, T, S] says which slots each token sees (see
    `kv_cache.visibility`). Returns (last-position logits [B, V], updated cache), plus with `return_depth` the
    decoder layers each row ran [B] (fewer than all when a decode step exits early, see `config.exit_layers`)."""
    out = self._run_cached(inputs, cache, index, mask)
    return out if return_depth else out[:2]

  def _run_cached(self, inputs, cache, index, mask):
    cfg = self.config
    x, deepstack = self.embed_inputs(inputs)
    cos, sin = self._rope(inputs.positions, x.dtype)
    segment_ids = inputs.segment_ids if mask is None else None
    early = bool(cfg.exit_layers) and mask is not None and x.shape[1] == 1  # decode steps only
    confident = self._exit_test() if early else None
    b = x.shape[0]

    def body(layer, carry, group):
      h, kv, exited, depth = carry
      for n in self._layer_numbers(group):
        if not early:
          h, _, kv = layer(h, cos, sin, segment_ids, (kv, n, index, mask))
        else:  # rows that exited keep their state; a batch that all exited only writes this layer's KV
          def run(layer, h, kv):
            out, _, kv = layer(h, cos, sin, segment_ids, (kv, n, index, mask))
            return jnp.where(exited[:, None, None], h, out), kv

          h, kv = nnx.cond(exited.all(), lambda layer, h, kv: (h, layer.write_kv(h, cos, sin, (kv, n, index, mask))),
                           run, layer, h, kv)
          depth = depth + (~exited).astype(jnp.int32)
          exited = exited | (jnp.isin(n, jnp.asarray(cfg.exit_layers)) & confident(h))
        h = _add_deepstack(h, deepstack, n)
      return (h, kv, exited, depth), None

    carry = (x, cache, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    (x, cache, _, depth), _ = run_stack(self.layers, body, carry, self._groups(), scan=cfg.scan_layers)
    if not early:
      depth = jnp.full((b,), cfg.text.num_hidden_layers, jnp.int32)
    return self.logits(self.norm(x[:, -1:]))[:, 0], cache, depth

  def _exit_test(self):
    """h [B, 1, H] -> [B] bool: the shared LM head's top probability on the normed state exceeds the threshold
    (strictly: a threshold of 1.0 never exits)."""
    threshold = self.config.exit_threshold
    return lambda h: jax.nn.softmax(self.logits(self.norm(h[:, -1])), axis=-1).max(-1) > threshold

  # ---------------------------------------------------------------------------------------------- host side
  def __call__(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
               video_grid_thw=None, attention_mask=None, position_ids=None):
    """HF-style call: returns logits [batch, length, vocab]; positions are computed when not given."""
    inputs, _ = prepare_inputs(self.config, input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                               pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                               attention_mask=attention_mask, position_ids=position_ids)
    graphdef, state = nnx.split(self)
    logits, _ = _jit_forward(graphdef, state, inputs)
    return logits


def _add_deepstack(h, deepstack, i):
  """After decoder layer i < levels, add DeepStack level i (zeros at text positions)."""
  if deepstack is None or not deepstack.shape[0]:
    return h
  levels = deepstack.shape[0]
  return h + jnp.where(i < levels, deepstack[jnp.minimum(i, levels - 1)], jnp.zeros((), h.dtype))


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, inputs):
  return nnx.merge(graphdef, state).forward(inputs)


def with_runtime(model: Qwen3VL, **runtime) -> Qwen3VL:
  """The same weights under other runtime switches (`RUNTIME_FIELDS`: dtype aside, e.g. exit_layers,
  exit_threshold, attention_impl, remat): a new module graph around the same parameter arrays."""
  cfg = model.config.replace(**runtime).validate()
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def init_model(cfg: ModelConfig, seed: int = 0) -> Qwen3VL:
  """A randomly initialised model (tests, training from scratch)."""
  return Qwen3VL(cfg, rngs=nnx.Rngs(seed))


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts by part, from abstract shapes (no memory is allocated)."""
  model = nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  counts = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    part = str(getattr(path[0], "key", path[0]))
    counts[part] = counts.get(part, 0) + int(np.prod(leaf.shape))
  counts["total"] = sum(counts.values())
  return counts
