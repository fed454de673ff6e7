"""Text decoder layer: RMSNorm, GQA attention with per-head q/k RMSNorm and interleaved MRoPE, SwiGLU or MoE.

Attention goes through `kernels.attention` (the one entry point for every implementation). Padding and
packed samples are expressed as segment ids, never as a dense [L, L] mask; only tokens that attend to a KV
cache (generation) take a [B, L, S] visibility mask, see `kv_cache`.
"""
from __future__ import annotations

import jax
from flax import nnx

from qwen3vl import kernels
from qwen3vl.config import ModelConfig
from qwen3vl.model import rope
from qwen3vl.model.layers import Linear, RMSNorm, precision_kwargs
from qwen3vl.model.remat import tag as checkpoint_tag
from qwen3vl.sharding import constrain

HEADS = ("batch", "length", "act_heads", None)  # [B, L, heads, head_dim]
from qwen3vl.model.moe import MoE


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    t = cfg.text
    kw, lin = precision_kwargs(cfg, "decoder", rngs)
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    self.q_proj = Linear(t.hidden_size, q, ("embed", "heads"), bias=False, tag="q_proj", **kw, **lin)
    self.k_proj = Linear(t.hidden_size, kv, ("embed", "kv_heads"), bias=False, tag="k_proj", **kw, **lin)
    self.v_proj = Linear(t.hidden_size, kv, ("embed", "kv_heads"), bias=False, tag="v_proj", **kw, **lin)
    self.o_proj = Linear(q, t.hidden_size, ("heads", "embed"), bias=False, tag="o_proj", **kw, **lin)
    self.q_norm = RMSNorm(t.head_dim, ("head_dim",), eps=t.rms_norm_eps, **kw)
    self.k_norm = RMSNorm(t.head_dim, ("head_dim",), eps=t.rms_norm_eps, **kw)
    self.head_dim, self.attention_impl = t.head_dim, cfg.attention_impl

  def qkv(self, x, cos, sin):
    """Queries, keys, values [B, L, heads, D] of x [B, L, H], normed and rotated."""
    b, l, _ = x.shape
    q = self.q_norm(constrain(self.q_proj(x).reshape(b, l, -1, self.head_dim), HEADS))
    k = self.k_norm(constrain(self.k_proj(x).reshape(b, l, -1, self.head_dim), HEADS))
    v = constrain(self.v_proj(x).reshape(b, l, -1, self.head_dim), HEADS)
    return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v

  def __call__(self, x, cos, sin, segment_ids, cache=None):
    """cache (generation): (the stacked KVCache, this layer's number, write index, mask [B, L, S] or None). The
    new keys and values are written at slots index..index+L-1 of this layer; with no mask (a prompt) the tokens
    attend among themselves through `kernels.attention`, with a mask (decode steps, later chunks) to the cache
    slots it shows. Returns (output, updated KVCache or None)."""
    b, l, _ = x.shape
    q, k, v = self.qkv(x, cos, sin)
    kv, layer, index, mask = cache if cache is not None else (None, 0, 0, None)
    if kv is not None:
      kv = kv.write(layer, k, v, index)
    if mask is None:
      o = kernels.attention(q, k, v, causal=True, segment_ids=segment_ids, implementation=self.attention_impl)
    else:
      o = kv.attend(layer, q, mask)
    o = checkpoint_tag(o, "attention")
    return self.o_proj(o.reshape(b, l, -1)), kv


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    t = cfg.text
    kw, lin = precision_kwargs(cfg, "decoder", rngs)
    h, i = t.hidden_size, t.intermediate_size
    self.gate_proj = Linear(h, i, ("embed", "mlp"), bias=False, tag="mlp_gate", **kw, **lin)
    self.up_proj = Linear(h, i, ("embed", "mlp"), bias=False, tag="mlp_up", **kw, **lin)
    self.down_proj = Linear(i, h, ("mlp", "embed"), bias=False, tag="mlp_down", **kw, **lin)

  def __call__(self, x):
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(h, ("batch", "length", "act_mlp")))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    t = cfg.text
    kw, _ = precision_kwargs(cfg, "decoder", rngs)
    self.input_norm = RMSNorm(t.hidden_size, ("embed",), eps=t.rms_norm_eps, **kw)
    self.attn = Attention(cfg, rngs)
    self.post_attention_norm = RMSNorm(t.hidden_size, ("embed",), eps=t.rms_norm_eps, **kw)
    self.mlp = MoE(cfg, rngs) if t.is_moe else MLP(cfg, rngs)

  def __call__(self, x, cos, sin, segment_ids, cache=None):
    """x [B, L, H] -> (x, MoE routing or None, updated cache or None): routing = (router logits [B*L, E], fraction
    of token copies dropped); see Attention for cache."""
    a, cache = self.attn(self.input_norm(x), cos, sin, segment_ids, cache)
    h = x + a
    if isinstance(self.mlp, MoE):  # padding (segment 0) takes no room in the experts' receive buffers
      queries = segment_ids[0] if isinstance(segment_ids, tuple) else segment_ids  # (queries', keys' ids)
      y, logits, dropped = self.mlp(self.post_attention_norm(h), None if queries is None else queries > 0)
      routing = (logits, dropped)
    else:
      y, routing = self.mlp(self.post_attention_norm(h)), None
    return (h + y).astype(x.dtype), routing, cache  # the residual stream keeps its dtype (precision)

  def write_kv(self, x, cos, sin, cache):
    """Only this layer's keys and values of x written to the cache (a token that exited before this layer:
    later tokens attend to its exit state here, as CALM propagates it)."""
    kv, layer, index, _ = cache
    _, k, v = self.attn.qkv(self.input_norm(x), cos, sin)
    return kv.write(layer, k, v, index)
