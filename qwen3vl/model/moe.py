"""Qwen3-VL-MoE sparse block: softmax router, top-k, renormalised weights, no shared expert.

Two paths, one numeric definition: "ragged" (dropless: the token copies are sorted by expert and the experts
run as `jax.lax.ragged_dot`, so compute follows the routed load) and "dense" (every expert on every token,
weighted by a scattered weight matrix; the reference the tests compare against). Expert weights use the
released checkpoint layout: gate_up [E, H, 2I] (gate first), down [E, I, H].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3vl.config import ModelConfig
from qwen3vl.model.layers import param


class MoE(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    t = cfg.text
    e, h, i = t.num_experts, t.hidden_size, t.moe_intermediate_size
    self.router = param(rngs, (h, e), ("embed", None), cfg.param_dtype)
    self.gate_up = param(rngs, (e, h, 2 * i), ("experts", "embed", "mlp"), cfg.param_dtype)
    self.down = param(rngs, (e, i, h), ("experts", "mlp", "embed"), cfg.param_dtype)
    self.top_k, self.dtype, self.impl = t.num_experts_per_tok, cfg.dtype, cfg.moe_impl

  def route(self, x: jax.Array):
    """x [T, H] -> (router logits [T, E], top-k weights [T, k] in the activation dtype, expert ids [T, k])."""
    logits = x @ self.router[...].astype(self.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, self.top_k)
    weights = weights / weights.sum(-1, keepdims=True)  # HF always renormalises the top-k
    return logits, weights.astype(self.dtype), experts

  def __call__(self, x: jax.Array):
    """x [..., H] -> (y [..., H], router logits [tokens, E])."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).astype(self.dtype)
    logits, weights, experts = self.route(x)
    y = self._dense(x, weights, experts) if self.impl == "dense" else self._ragged(x, weights, experts)
    return y.reshape(shape), logits

  def _expert_mlp(self, h: jax.Array) -> jax.Array:
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate) * up

  def _ragged(self, x, weights, experts):
    t, k = experts.shape
    num_experts = self.gate_up.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x[token]
    h = jax.lax.ragged_dot(xs, self.gate_up[...].astype(self.dtype), group_sizes)
    out = jax.lax.ragged_dot(self._expert_mlp(h), self.down[...].astype(self.dtype), group_sizes)
    out = out * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[token].add(out)

  def _dense(self, x, weights, experts):
    num_experts = self.gate_up.shape[0]
    scatter = jnp.zeros((x.shape[0], num_experts), self.dtype)
    scatter = scatter.at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
    h = jnp.einsum("th,ehi->eti", x, self.gate_up[...].astype(self.dtype))
    y = jnp.einsum("eti,eih->eth", self._expert_mlp(h), self.down[...].astype(self.dtype))
    return jnp.einsum("eth,te->th", y, scatter)
