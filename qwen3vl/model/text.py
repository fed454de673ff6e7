"""Text decoder layer: RMSNorm, GQA attention with per-head q/k RMSNorm and interleaved MRoPE, SwiGLU or MoE.

Attention goes through `kernels.attention` (the one entry point for every implementation). Padding and
packed samples are expressed as segment ids, never as a dense [L, L] mask.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from qwen3vl.config import ModelConfig
from qwen3vl.model import rope
from qwen3vl.model.layers import Linear, RMSNorm
from qwen3vl.model.moe import MoE


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    t, kw = cfg.text, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.q_proj = Linear(t.hidden_size, t.num_attention_heads * t.head_dim, ("embed", "heads"), bias=False, **kw)
    self.k_proj = Linear(t.hidden_size, t.num_key_value_heads * t.head_dim, ("embed", "kv_heads"), bias=False, **kw)
    self.v_proj = Linear(t.hidden_size, t.num_key_value_heads * t.head_dim, ("embed", "kv_heads"), bias=False, **kw)
    self.o_proj = Linear(t.num_attention_heads * t.head_dim, t.hidden_size, ("heads", "embed"), bias=False, **kw)
    self.q_norm = RMSNorm(t.head_dim, ("head_dim",), eps=t.rms_norm_eps, **kw)
    self.k_norm = RMSNorm(t.head_dim, ("head_dim",), eps=t.rms_norm_eps, **kw)
    self.head_dim, self.attention_impl = t.head_dim, cfg.attention_impl

  def __call__(self, x, cos, sin, segment_ids, cache=None):
    """cache (generation): (k [B, S, Hkv, D], v, index, kv_valid [B, S] or None). The new keys and values are
    written at slots index..; a prompt (length > 1, written at 0) attends within itself, a decode step (length
    1) to the valid slots. Returns (output, updated (k, v) or None)."""
    b, l, _ = x.shape
    q = self.q_norm(self.q_proj(x).reshape(b, l, -1, self.head_dim))
    k = self.k_norm(self.k_proj(x).reshape(b, l, -1, self.head_dim))
    v = self.v_proj(x).reshape(b, l, -1, self.head_dim)
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    attend = functools.partial(kernels.attention, implementation=self.attention_impl)
    if cache is None:
      return self.o_proj(attend(q, k, v, causal=True, segment_ids=segment_ids).reshape(b, l, -1)), None
    k_cache, v_cache, index, kv_valid = cache
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
    if l > 1:
      o = attend(q, k, v, causal=True, segment_ids=segment_ids)
    else:
      ids = (jnp.ones((b, 1), jnp.int32), kv_valid.astype(jnp.int32))
      o = attend(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), causal=False, segment_ids=ids)
    return self.o_proj(o.reshape(b, l, -1)), (k_cache, v_cache)


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    t, kw = cfg.text, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.gate_proj = Linear(t.hidden_size, t.intermediate_size, ("embed", "mlp"), bias=False, **kw)
    self.up_proj = Linear(t.hidden_size, t.intermediate_size, ("embed", "mlp"), bias=False, **kw)
    self.down_proj = Linear(t.intermediate_size, t.hidden_size, ("mlp", "embed"), bias=False, **kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    t, kw = cfg.text, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.input_norm = RMSNorm(t.hidden_size, ("embed",), eps=t.rms_norm_eps, **kw)
    self.attn = Attention(cfg, rngs)
    self.post_attention_norm = RMSNorm(t.hidden_size, ("embed",), eps=t.rms_norm_eps, **kw)
    self.mlp = MoE(cfg, rngs) if t.is_moe else MLP(cfg, rngs)

  def __call__(self, x, cos, sin, segment_ids, cache=None):
    """x [B, L, H] -> (x, router logits [B*L, E] or None, updated cache or None); see Attention for cache."""
    a, cache = self.attn(self.input_norm(x), cos, sin, segment_ids, cache)
    x = x + a
    y = self.mlp(self.post_attention_norm(x))
    y, router_logits = y if isinstance(self.mlp, MoE) else (y, None)
    return x + y, router_logits, cache
