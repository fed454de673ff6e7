"""Basic layers: Linear, LayerNorm, RMSNorm, Embed, each parameter tagged with logical axis names.

Logical names (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`, `experts`, ...) are stored as the
`out_sharding` metadata of every `nnx.Param` with eager sharding off: the model names no mesh axis, and the
sharding rules (a table in the config) turn names into mesh axes later. Kernels are stored [in, out].
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3vl.model.remat import tag as checkpoint_tag

Axes = Sequence[str | None]
_default_init = nnx.initializers.normal(0.02)


def param(rngs: nnx.Rngs, shape, axes: Axes, dtype, init=_default_init) -> nnx.Param:
  """A parameter with logical axis names (no mesh needed to create it)."""
  assert len(axes) == len(shape), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


def _matmul_2d(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., in] @ w [in, out] as one 2-D matmul: XLA:CPU runs the [B, L, in] batched form of a SwiGLU MLP's
  forward and backward 1.8x slower than the flattened one (same FLOPs); other backends see the same dot."""
  return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel [in, out] in param dtype, computed in the activation dtype. `tag` names the
  output for the rematerialization policies (see model/remat.py)."""

  def __init__(self, d_in: int, d_out: int, axes: Axes, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs,
               tag: str | None = None):
    self.kernel = param(rngs, (d_in, d_out), axes, param_dtype)
    self.bias = param(rngs, (d_out,), axes[-1:], param_dtype, nnx.initializers.zeros) if bias else None
    self.dtype, self.tag = dtype, tag

  def __call__(self, x: jax.Array) -> jax.Array:
    y = _matmul_2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return checkpoint_tag(y, self.tag) if self.tag else y


class LayerNorm(nnx.Module):
  """LayerNorm with weight and bias, statistics in float32 (as torch does for float32 and bf16)."""

  def __init__(self, dim: int, axes: Axes, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.scale = param(rngs, (dim,), axes, param_dtype, nnx.initializers.ones)
    self.bias = param(rngs, (dim,), axes, param_dtype, nnx.initializers.zeros)
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """Qwen3 RMSNorm: normalise in float32, cast back to the input dtype, then multiply by the weight."""

  def __init__(self, dim: int, axes: Axes, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.scale = param(rngs, (dim,), axes, param_dtype, nnx.initializers.ones)
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


class Embed(nnx.Module):
  """Token embedding table [vocab, embed]; `attend` is the tied LM head."""

  def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), param_dtype)
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return _matmul_2d(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
