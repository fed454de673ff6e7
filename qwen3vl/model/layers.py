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

from qwen3vl.model import quant
from qwen3vl.model.lora import LoRA, LoraSpec
from qwen3vl.model.remat import tag as checkpoint_tag

Axes = Sequence[str | None]
_default_init = nnx.initializers.normal(0.02)


def param(rngs: nnx.Rngs, shape, axes: Axes, dtype, init=_default_init) -> nnx.Param:
  """A parameter with logical axis names (no mesh needed to create it)."""
  assert len(axes) == len(shape), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


def precision_kwargs(cfg, part: str, rngs: nnx.Rngs) -> tuple[dict, dict]:
  """(arguments of every module of a model part, extra Linear arguments): the part's compute dtype and float8
  matmuls under `ModelConfig.precision`, LoRA adapters and a quantized frozen base (`lora_spec`, `base_quant`)."""
  dtype, fp8 = cfg.precision_of(part)
  return dict(dtype=dtype, param_dtype=cfg.param_dtype, rngs=rngs), dict(fp8=fp8, lora=cfg.lora_spec,
                                                                          quant=cfg.base_quant)


def _matmul_2d(x: jax.Array, w: jax.Array, fp8: bool = False) -> jax.Array:
  """x [..., in] @ w [in, out] as one 2-D matmul: XLA:CPU runs the [B, L, in] batched form of a SwiGLU MLP's
  forward and backward 1.8x slower than the flattened one (same FLOPs); other backends see the same dot.
  fp8: see `_fp8_matmul`."""
  x2 = x.reshape(-1, x.shape[-1])
  y = _fp8_matmul(x2, w) if fp8 else x2 @ w
  return y.reshape(*x.shape[:-1], w.shape[-1])


def _to_fp8(a: jax.Array):
  """a -> (float8 e4m3 values, float32 scale) with a ~= values * scale (one scale per tensor, from its max)."""
  scale = jnp.maximum(jnp.max(jnp.abs(a.astype(jnp.float32))), 1e-12) / 448.0
  return (a.astype(jnp.float32) / scale).astype(jnp.float8_e4m3fn), scale


@jax.custom_vjp
def _fp8_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [m, k] @ w [k, n] with both operands in float8 e4m3 and float32 accumulation, in x's dtype. The backward
  runs in float32 on the dequantized operands (gradients would underflow in e4m3 without their own scaling) and
  keeps only the float8 operands between the passes."""
  return _fp8_forward(x, w)[0]


def _fp8_forward(x, w):
  (xq, sx), (wq, sw) = _to_fp8(x), _to_fp8(w)
  y = jax.lax.dot(xq, wq, preferred_element_type=jnp.float32) * (sx * sw)
  return y.astype(x.dtype), (xq, sx, wq, sw, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_backward(residuals, g):
  xq, sx, wq, sw, x_type, w_type = residuals
  g = g.astype(jnp.float32)
  dx = g @ (wq.astype(jnp.float32) * sw).T
  dw = (xq.astype(jnp.float32) * sx).T @ g
  return dx.astype(x_type.dtype), dw.astype(w_type.dtype)


_fp8_matmul.defvjp(_fp8_forward, _fp8_backward)


def quantizable(rngs: nnx.Rngs, shape, axes: Axes, param_dtype, kind: str):
  """(weight, scales or None): a parameter in `param_dtype`, or int8 / nf4 codes and their scales (model/quant.py)
  when `kind` names a quantization."""
  if not kind:
    return param(rngs, shape, axes, param_dtype), None
  return (param(rngs, shape, axes, quant.code_dtype(kind), nnx.initializers.zeros),
          param(rngs, quant.scale_shape(kind, shape), axes, jnp.float32, nnx.initializers.ones))


def weight_value(w: nnx.Param, scale: nnx.Param | None, dtype) -> jax.Array:
  """A weight in `dtype`, dequantized when it is held as codes."""
  return w[...].astype(dtype) if scale is None else quant.dequantize(w[...], scale[...], dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel [in, out] in param dtype, computed in the activation dtype. `tag` names the
  output for the rematerialization policies (see model/remat.py). `lora`: adapters when the spec targets this
  layer's name (`lora_name`, default the tag); `quant`: the kernel held as int8 / nf4 codes (a frozen base)."""

  def __init__(self, d_in: int, d_out: int, axes: Axes, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs,
               tag: str | None = None, fp8: bool = False, lora: LoraSpec | None = None,
               lora_name: str | None = None, quant: str = ""):
    self.kernel, self.kernel_scale = quantizable(rngs, (d_in, d_out), axes, param_dtype, quant)
    self.bias = param(rngs, (d_out,), axes[-1:], param_dtype, nnx.initializers.zeros) if bias else None
    targeted = lora is not None and (lora_name or tag) in lora.targets
    self.kernel_lora = LoRA((d_in, d_out), axes, lora, rngs) if targeted else None
    self.dtype, self.tag, self.fp8 = dtype, tag, fp8

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = _matmul_2d(x, weight_value(self.kernel, self.kernel_scale, self.dtype), self.fp8)
    if self.kernel_lora is not None:
      y = y + self.kernel_lora.delta(x, _matmul_2d)
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

  def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, head_dtype=None,
               head_fp8: bool = False):
    self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), param_dtype)
    self.dtype, self.head_dtype, self.head_fp8 = dtype, head_dtype or dtype, head_fp8

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return _matmul_2d(x.astype(self.head_dtype), self.embedding[...].astype(self.head_dtype).T, self.head_fp8)
