"""The full Qwen3-VL model: vision tower, token embedding with visual features, scanned decoder, LM head.

`forward(inputs)` is the pure device function (jit it over `nnx.split` state); `__call__` is the convenience
entry for notebooks: it prepares the inputs on the host and runs a compiled forward.

DeepStack inside the scan: the per-level visual features are scattered once into a dense [levels, B, L, H]
tensor (zeros at text positions) that the scanned body indexes with the layer number; after layer i < levels
it adds level i. Adding exact zeros elsewhere keeps the numbers identical to HF's masked add.

The scan runs one *unit* per step: a layer, `share_every` layers on one weight set, or `mod_every` consecutive
layers whose last is routed (Mixture-of-Depths, depth.py), so every step of the scan has the same structure.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3vl.config import ModelConfig
from qwen3vl.sharding import constrain
from qwen3vl.model import depth, rope, token_merge
from qwen3vl.model.inputs import ModelInputs, prepare_inputs
from qwen3vl.model.kv_cache import KVCache
from qwen3vl.model.layers import Embed, Linear, RMSNorm
from qwen3vl.model.stack import block_stack, build_stack, index_stack, run_stack
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
    self.depth_routers = build_stack(lambda r: depth.DepthRouter(cfg, r), t.num_hidden_layers // cfg.mod_every,
                                     rngs) if cfg.mod_every else None
    self.norm = RMSNorm(t.hidden_size, ("embed",), eps=t.rms_norm_eps, **kw)
    self.lm_head = None if cfg.tie_word_embeddings else Linear(
        t.hidden_size, t.vocab_size, ("embed", "vocab"), bias=False, fp8=head_fp8,
        **dict(kw, dtype=head_dtype))
    self.config = cfg

  # ------------------------------------------------------------------------------------------- device side
  def embed_inputs(self, inputs: ModelInputs):
    """Token embeddings with visual features scattered in, the dense DeepStack tensor (or None), and the
    positions (with token merging, each visual token's grid offset added to its frame origin)."""
    x, positions = self.embed(inputs.input_ids), inputs.positions
    if inputs.pixel_values is None:
      return x, None, positions
    merged, deepstack = self.visual(inputs.pixel_values, inputs.vision)
    visual = inputs.visual_rows >= 0  # rows computed on the host (inputs.visual_rows)
    row = jnp.clip(inputs.visual_rows, 0, merged.shape[0] - 1)
    ratio = self.config.vision_token_ratio
    if ratio < 1:
      v = inputs.vision
      merged, deepstack, grid = token_merge.merge_tokens(merged, deepstack, v.segment_ids, v.rowcol,
                                                         self.config.vision.spatial_merge_size, ratio)
      offset = jnp.concatenate([jnp.zeros_like(grid[:, :1]), grid], -1)[row]  # [B, L, 3]: (0, row, col)
      positions = positions + jnp.where(visual[..., None], offset, 0).transpose(2, 0, 1).astype(positions.dtype)
    ds = jnp.zeros((deepstack.shape[0],) + x.shape, x.dtype)
    x = jnp.where(visual[..., None], merged[row].astype(x.dtype), x)
    ds = jnp.where(visual[None, ..., None], deepstack[:, row].astype(x.dtype), ds)
    return x, ds, positions

  def forward(self, inputs: ModelInputs, *, return_hidden_states: bool = False, return_hidden: bool = False,
              mod_routing: str = "predictor"):
    """Logits [B, L, vocab] (float32) plus extras: router logits [layers, B*L, E] and the fraction of token copies
    dropped for want of room [layers] (all_to_all with a capacity factor) for MoE, per-layer hidden
    states. `return_hidden` returns the final-normed hidden states instead of logits (for a chunked loss).
    Mixture-of-Depths layers route by `mod_routing`: "topk" (training: the row's top capacity, gathered) or
    "predictor" (causal, as decoding does); extras then hold "router_mask" [layers, B*L] (tokens each layer
    processed) and "depth" (predictor loss, agreement with the top-k, processed fraction)."""
    cfg = self.config
    x, deepstack, positions = self.embed_inputs(inputs)
    x = constrain(x, HIDDEN)
    cos, sin = self._rope(positions, x.dtype)
    seg, valid = inputs.segment_ids, inputs.segment_ids > 0

    def body(unit, h, u):
      outs = []
      for (layer, router), n in zip(self._unit_layers(unit), self._layer_numbers(u)):
        stats = None
        if router is None:
          h, routing, _ = layer(h, cos, sin, seg)
          processed = valid
        elif mod_routing == "topk":
          h, routing, processed, stats = depth.route_topk(layer, router, h, cos, sin, seg, cfg.mod_capacity)
        else:
          logits, (_, chosen) = router.predict(h), depth.topk_choice(router.score(h), valid, cfg.mod_capacity)
          h, routing, processed, _ = depth.route_causal(layer, router, h, cos, sin, seg)
          stats = depth.predictor_stats(logits, chosen, valid, processed)
        if cfg.mod_every:
          stats = stats or depth.no_stats()
          routing = (routing, (processed & valid).reshape(-1), stats)
        h = constrain(_add_deepstack(h, deepstack, n), HIDDEN)
        outs.append((routing, h if return_hidden_states else None))
      return h, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    units, xs = self._scan_units()
    x, per_layer = run_stack(units, body, x, xs, scan=cfg.scan_layers, remat=cfg.remat,
                             remat_custom=cfg.remat_custom)
    routing, hidden = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), per_layer)  # [layers, ...]
    x = self.norm(x)
    extras = {}
    if cfg.mod_every:
      routing, extras["router_mask"], stats = routing
      stats = jax.tree.map(jnp.sum, stats)
      extras["depth"] = {"predictor_loss": stats["loss"] / jnp.maximum(stats["tokens"], 1.0),
                         "predictor_agreement": stats["agree"] / jnp.maximum(stats["tokens"], 1.0),
                         "processed": stats["processed"] / jnp.maximum(stats["tokens"], 1.0)}
    extras["router_logits"], extras["moe_dropped"] = (None, None) if routing is None else routing
    if return_hidden_states:
      extras["hidden_states"] = hidden
    if return_hidden:
      return x, extras
    return self.logits(x), extras

  def _scan_units(self):
    """(stacked modules, unit numbers) of the decoder scan; see the module docstring."""
    cfg = self.config
    units = cfg.text.num_hidden_layers // self._unit_size()
    if cfg.mod_every:
      return (block_stack(self.layers, cfg.mod_every), self.depth_routers), jnp.arange(units)
    return self.layers, jnp.arange(units)

  def _unit_size(self):
    return self.config.mod_every or self.config.share_every

  def _unit_layers(self, unit):
    """[(layer, its Mixture-of-Depths router or None)] for the layers of one scan unit, in order."""
    m = self.config.mod_every
    if not m:
      return [(unit, None)] * self.config.share_every
    layers, router = unit
    return [(index_stack(layers, j), router if j == m - 1 else None) for j in range(m)]

  def _layer_numbers(self, unit):
    """The decoder layers a scan unit runs, in order (DeepStack and the KV cache count these)."""
    k = self._unit_size()
    return [unit * k + j for j in range(k)]

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
                         kv_dtype, track_skips=bool(self.config.mod_every))

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
    x, deepstack, positions = self.embed_inputs(inputs)
    cos, sin = self._rope(positions, x.dtype)
    segment_ids = inputs.segment_ids if mask is None else None
    early = bool(cfg.exit_layers) and mask is not None and x.shape[1] == 1  # decode steps only
    confident = self._exit_test() if early else None
    b = x.shape[0]

    def body(unit, carry, u):
      h, kv, exited, ran = carry
      for (layer, router), n in zip(self._unit_layers(unit), self._layer_numbers(u)):
        at = (kv, n, index, mask)
        if router is not None:  # Mixture-of-Depths: the predictor decides (early exit does not combine with it)
          h, _, taken, kv = depth.route_causal(layer, router, h, cos, sin, segment_ids, at)
          ran = ran + taken[:, -1].astype(jnp.int32)
        elif not early:
          h, _, kv = layer(h, cos, sin, segment_ids, at)
          ran = ran + 1
        else:  # rows that exited keep their state; a batch that all exited only writes this layer's KV
          def run(layer, h, kv):
            out, _, kv = layer(h, cos, sin, segment_ids, (kv, n, index, mask))
            return jnp.where(exited[:, None, None], h, out), kv

          h, kv = nnx.cond(exited.all(), lambda layer, h, kv: (h, layer.write_kv(h, cos, sin, (kv, n, index, mask))),
                           run, layer, h, kv)
          ran = ran + (~exited).astype(jnp.int32)
          exited = exited | (jnp.isin(n, jnp.asarray(cfg.exit_layers)) & confident(h))
        h = _add_deepstack(h, deepstack, n)
      return (h, kv, exited, ran), None

    carry = (x, cache, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    units, xs = self._scan_units()
    (x, cache, _, ran), _ = run_stack(units, body, carry, xs, scan=cfg.scan_layers)
    return self.logits(self.norm(x[:, -1:]))[:, 0], cache, ran

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
