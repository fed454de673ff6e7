"""Mixture-of-Depths (Raposo et al., 2024) on every `mod_every`-th decoder layer (`ModelConfig.mod_every`).

Training (`route_topk`): a linear router scores each token; per row the top `mod_capacity` fraction goes through
the layer, gathered into a shorter sequence in original order (so attention stays causal and skipped tokens cost
no FLOPs), the rest ride the residual stream. The layer's update is scaled by sigmoid(score): that product is the
router's only gradient. The top-k sees the whole row, which decoding cannot: a small predictor (an MLP on the
stopped-gradient layer input) learns the router's choices, and evaluation, prefill and decoding let it decide
per token (`route_causal`: masked compute, a skipped token is no key for the others and keeps its state).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3vl.model.layers import Linear

PREDICTOR_HIDDEN = 64


class DepthRouter(nnx.Module):
  """Router (score: which tokens the layer processes) and causal predictor of one routed layer, in float32."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    h, kw = cfg.text.hidden_size, dict(dtype="float32", param_dtype=cfg.param_dtype, rngs=rngs)
    self.router = Linear(h, 1, ("embed", None), bias=False, **kw)
    self.predictor_in = Linear(h, PREDICTOR_HIDDEN, ("embed", None), bias=True, **kw)
    self.predictor_out = Linear(PREDICTOR_HIDDEN, 1, (None, None), bias=True, **kw)

  def score(self, x):
    """[B, L, H] -> [B, L] float32 router scores."""
    return self.router(x)[..., 0]

  def predict(self, x):
    """[B, L, H] -> [B, L] float32 logits of "the router would pick this token" (no gradient into x)."""
    return self.predictor_out(jax.nn.silu(self.predictor_in(jax.lax.stop_gradient(x))))[..., 0]


def route_topk(layer, router: DepthRouter, h, cos, sin, segment_ids, capacity: float):
  """The training path. h [B, L, H] -> (h, MoE routing (text.DecoderLayer) or None, processed tokens [B, L] bool,
  predictor statistics {loss, agree, tokens, processed} as float32 sums)."""
  b, l, _ = h.shape
  score, valid = router.score(h), segment_ids > 0
  idx, chosen = topk_choice(score, valid, capacity)
  k, rows = idx.shape[1], jnp.arange(b)[:, None]

  def gather(a):
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)

  seg = jnp.where(gather(chosen), gather(segment_ids), 0)  # padding picked to fill k stays padding
  x = gather(h)
  out, routing, _ = layer(x, gather(cos), gather(sin), seg)
  weight = jax.nn.sigmoid(gather(score)) * (seg > 0)
  h = h.at[rows, idx].add((weight[..., None] * (out - x)).astype(h.dtype))
  if routing is not None:  # router logits back to one row per token; tokens the layer skipped are masked out
    logits, dropped = routing
    routing = (jnp.zeros((b, l, logits.shape[-1]), logits.dtype).at[rows, idx].set(
        logits.reshape(b, k, -1)).reshape(b * l, -1), dropped)
  return h, routing, chosen, predictor_stats(router.predict(h), chosen, valid, chosen)


def topk_choice(score, valid, capacity: float):
  """Per row, the top ceil(capacity * L) valid tokens by score: (indices [B, k] in original order, so attention
  among them stays causal; chosen [B, L] bool)."""
  b, l = score.shape
  _, idx = jax.lax.top_k(jnp.where(valid, score, -jnp.inf), max(1, math.ceil(capacity * l)))
  idx = jnp.sort(idx, axis=-1)
  return idx, jnp.zeros((b, l), bool).at[jnp.arange(b)[:, None], idx].set(True) & valid


def no_stats() -> dict:
  """predictor_stats of a layer that is not routed."""
  return dict.fromkeys(("loss", "agree", "tokens", "processed"), jnp.zeros((), jnp.float32))


def predictor_stats(logits, chosen, valid, processed) -> dict:
  """Binary cross-entropy of the predictor against the router's top-k choice, their agreement, and how many
  tokens the layer processed (sums over valid tokens)."""
  target = chosen.astype(jnp.float32)
  bce = jax.nn.softplus(logits) - target * logits
  m = valid.astype(jnp.float32)
  return {"loss": (bce * m).sum(), "agree": (((logits > 0) == chosen) * m).sum(), "tokens": m.sum(),
          "processed": (processed * m).sum()}


def route_causal(layer, router: DepthRouter, h, cos, sin, segment_ids, cache=None):
  """Inference: the predictor decides per token, causally. With `cache` (kv, layer number, index, mask; see
  text.Attention) the skipped tokens' slots of this layer are marked so later tokens never attend to them, and
  a batch where no token is taken runs nothing. Returns (h, MoE routing or None, taken [B, L], kv)."""
  take = router.predict(h) > 0
  if segment_ids is not None:  # a skipped token is no key for anyone (its own output is dropped)
    segment_ids = (segment_ids, jnp.where(take, segment_ids, -1))

  def run(layer, router, h, kv):
    out, routing, kv = layer(h, cos, sin, segment_ids, None if cache is None else (kv,) + cache[1:])
    weight = jax.nn.sigmoid(router.score(h))[..., None]
    return jnp.where(take[..., None], h + (weight * (out - h)).astype(h.dtype), h), routing, kv

  if cache is None:
    h, routing, _ = run(layer, router, h, None)
    return h, routing, take, None
  kv, n, index, _ = cache
  h, kv = nnx.cond(take.any(), lambda *a: run(*a)[::2], lambda layer, router, h, kv: (h, kv), layer, router, h, kv)
  return h, None, take, kv.mark_skipped(n, index, ~take)
