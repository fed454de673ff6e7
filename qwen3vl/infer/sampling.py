"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling (HF `generate`'s order of
warpers: temperature, then top-k, then top-p). Pure jnp, so it runs inside the compiled decode loop."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Static settings (hashable: they select a compiled loop). temperature 0 = greedy. `suppress`: token ids never
  chosen (HF's suppress_tokens), e.g. the vision placeholders, which a policy's answer must not hold."""
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  suppress: tuple[int, ...] = ()

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def next_token(logits: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
  """logits [B, V] float32 -> token ids [B] int32."""
  if s.suppress:
    logits = logits.at[..., jnp.asarray(s.suppress)].set(-jnp.inf)
  if s.temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / s.temperature
  if s.top_k is not None and s.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p is not None and s.top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
    drop_sorted = cum - jax.nn.softmax(sorted_logits, -1) >= s.top_p  # mass before this token already >= p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)
