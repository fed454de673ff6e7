"""The KV cache of generation: keys and values of every layer in slots [B, S], in the compute dtype or in int8.

int8 keeps one scale per (slot, kv head) vector (max |x| / 127, stored in the compute dtype): a bfloat16 cache
shrinks to 0.52x, a float32 one to 0.27x. The scales never touch the big tensors: a key scale multiplies the
scores of its slot and a value scale the probability of its slot, so attention reads the int8 arrays as they are.

Attention against the cache is plain XLA (einsum, masked softmax in float32): a decode step reads the cache
once and does little arithmetic, so a kernel would gain little; prompts go through `kernels.attention` instead.
Slots are written in order, one scalar index for the whole batch; a [B, T, S] mask says what each new token
sees, so padding and finished rows are holes that are never attended to. The whole stacked cache rides in the
carry of the layer scan and each layer writes only its new slots, so XLA updates it in place: passing per-layer
slices through the scan instead would copy the whole cache at every decode step. On a mesh (generate(mesh=...))
the cache follows the sharding rules like everything else: batch over the data axes, kv heads over tensor.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwen3vl.sharding import constrain

KV_DTYPES = ("auto", "int8")
AXES = ("layers", "batch", "length", "kv_heads", "head_dim")  # logical axes of k and v (scales: the first four)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  k: jax.Array  # [layers, B, S, Hkv, D]
  v: jax.Array
  k_scale: jax.Array | None = None  # [layers, B, S, Hkv] for int8
  v_scale: jax.Array | None = None
  # [layers, B, S] bool, Mixture-of-Depths only: the token of a slot skipped that layer, so nobody attends to it
  # there (False by default, also for slots added later by padding).
  skipped: jax.Array | None = None

  @classmethod
  def empty(cls, num_layers: int, batch: int, size: int, num_kv_heads: int, head_dim: int, dtype,
            kv_dtype: str = "auto", track_skips: bool = False) -> "KVCache":
    """Zeros; kv_dtype "auto" stores the compute dtype, "int8" int8 plus per-(slot, head) scales."""
    if kv_dtype not in KV_DTYPES:
      raise ValueError(f"kv cache dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    shape = (num_layers, batch, size, num_kv_heads, head_dim)
    skipped = jnp.zeros(shape[:3], bool) if track_skips else None
    if kv_dtype == "auto":
      return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), skipped=skipped).placed()
    zeros8, ones = jnp.zeros(shape, jnp.int8), jnp.ones(shape[:-1], dtype)
    return cls(zeros8, zeros8, ones, ones, skipped).placed()

  def placed(self) -> "KVCache":
    """Pinned to the sharding rules under a mesh context (a no-op without one)."""
    return jax.tree.map(lambda a: constrain(a, AXES[:a.ndim]), self)

  @property
  def quantized(self) -> bool:
    return self.k_scale is not None

  def nbytes(self) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self))

  def write(self, layer, k: jax.Array, v: jax.Array, index) -> "KVCache":
    """The cache with layer `layer`'s k, v [B, T, Hkv, D] written at slots index..index+T-1. Only those slots
    are touched: carried through the layer scan and the decode loop, the update happens in place."""
    def put(cache, x):
      x = x.astype(cache.dtype)[None]
      return jax.lax.dynamic_update_slice(cache, x, (layer, 0, index) + (0,) * (cache.ndim - 3))

    if not self.quantized:
      return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v)).placed()
    (k8, ks), (v8, vs) = _quantize(k, self.k_scale.dtype), _quantize(v, self.v_scale.dtype)
    return dataclasses.replace(self, k=put(self.k, k8), v=put(self.v, v8), k_scale=put(self.k_scale, ks),
                               v_scale=put(self.v_scale, vs)).placed()

  def mark_skipped(self, layer, index, skipped: jax.Array) -> "KVCache":
    """Slots index..index+T-1 of layer `layer` hidden from attention where `skipped` [B, T] is True."""
    update = jax.lax.dynamic_update_slice(self.skipped, skipped[None], (layer, 0, index))
    return dataclasses.replace(self, skipped=update)

  def attend(self, layer, q: jax.Array, mask: jax.Array) -> jax.Array:
    """Layer `layer`'s attention: q [B, T, H, D] against all slots, mask [B, T, S] (True = visible) ->
    [B, T, H, D]. Grouped heads share their kv head without copying it."""
    b, t, h, d = q.shape
    k, v = self.k[layer], self.v[layer]
    hkv = k.shape[-2]
    qg = q.reshape(b, t, hkv, h // hkv, d).astype(jnp.float32)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * (d ** -0.5)
    if self.quantized:
      scores = scores * _per_slot(self.k_scale[layer])
    if self.skipped is not None:
      mask = mask & ~self.skipped[layer][:, None, :]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    if self.quantized:
      probs = probs * _per_slot(self.v_scale[layer])
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)


def _quantize(x: jax.Array, scale_dtype) -> tuple[jax.Array, jax.Array]:
  """[..., D] -> int8 [..., D] and scale [...] with x ~= int8 * scale."""
  x32 = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
  q = jnp.round(x32 / jnp.where(scale == 0, 1.0, scale)[..., None])
  return jnp.clip(q, -127, 127).astype(jnp.int8), scale.astype(scale_dtype)


def _per_slot(scale: jax.Array) -> jax.Array:
  """[B, S, Hkv] -> [B, Hkv, 1, 1, S], broadcastable against scores [B, Hkv, G, T, S]."""
  return jnp.transpose(scale.astype(jnp.float32), (0, 2, 1))[:, :, None, None, :]


def visibility(valid: jax.Array, index, length: int) -> jax.Array:
  """[B, T, S] mask for T tokens written at index..: slot s is visible to token t when it holds a valid entry
  (`valid` [B, S], already including the new tokens) at or before the token's own slot; a token always sees
  itself, so padding rows of a chunk never meet an empty softmax."""
  slots = jnp.arange(valid.shape[1])
  own = index + jnp.arange(length)[:, None]  # [T, 1]
  return (valid[:, None, :] & (slots <= own)[None]) | (slots == own)[None]
