"""Losses and their metrics: next-token cross-entropy (float32, optionally over vocabulary chunks), MoE
load-balancing (HF's Switch-style formula) and router z-loss, per-sample exact match."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """Mean token cross-entropy over `mask`, in float32. Returns (loss, correct [B, L]): correct where the target's
  logit is the largest (greedy would pick it; a max, cheaper than an argmax's index search over the vocabulary)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  per_token = (lse - target_logit) * mask
  correct = target_logit >= jax.lax.stop_gradient(logits.max(-1))
  return per_token.sum() / jnp.maximum(mask.sum(), 1.0), correct


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int):
  """Cross-entropy of `hidden @ head` ([B, L, H] x [H, V]) without materialising [B, L, V] logits: a scan over
  vocabulary chunks keeps a running log-sum-exp and max. Returns (loss, correct [B, L]) as `cross_entropy`."""
  vocab = head.shape[1]
  pad = (-vocab) % chunk
  w = jnp.pad(head, ((0, 0), (0, pad))).reshape(head.shape[0], -1, chunk).transpose(1, 0, 2)
  h = hidden.astype(jnp.float32)

  @jax.checkpoint
  def step(carry, xs):
    lse, target_logit, best = carry
    w_c, start = xs
    logits = h @ w_c.astype(jnp.float32)
    ids = start + jnp.arange(chunk)
    logits = jnp.where(ids < vocab, logits, -jnp.inf)
    lse = jnp.logaddexp(lse, jax.nn.logsumexp(logits, axis=-1))
    hit = (targets[..., None] == ids)
    target_logit = target_logit + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return (lse, target_logit, jnp.maximum(best, logits.max(-1))), None

  shape = targets.shape
  init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.full(shape, -jnp.inf))
  (lse, target_logit, best), _ = jax.lax.scan(step, init, (w, jnp.arange(w.shape[0]) * chunk))
  per_token = (lse - target_logit) * mask
  return per_token.sum() / jnp.maximum(mask.sum(), 1.0), target_logit >= jax.lax.stop_gradient(best)


def moe_losses(router_logits: jax.Array, token_mask: jax.Array, top_k: int):
  """router_logits [layers, T, E], token_mask [T] -> (load-balancing loss, z-loss, expert load [E]).

  Load balancing as HF `load_balancing_loss_func`: E * sum_e f_e * P_e over all layers' tokens, where f_e is the
  share of top-k assignments (sums to k) and P_e the mean router probability; perfect balance gives k.
  """
  num_experts = router_logits.shape[-1]
  logits = router_logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  _, selected = jax.lax.top_k(probs, top_k)
  m = jnp.broadcast_to(token_mask.astype(jnp.float32), logits.shape[:-1])  # [layers, T]
  rows = m.sum()
  counts = jnp.zeros(num_experts).at[selected.reshape(-1)].add(jnp.repeat(m.reshape(-1), top_k))
  f = counts / rows
  p = (probs * m[..., None]).sum((0, 1)) / rows
  aux = num_experts * jnp.sum(f * p)
  z = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * m) / rows
  return aux, z, f


def exact_match(correct: jax.Array, mask: jax.Array, segment_ids: jax.Array):
  """Per-sample exact match: a sample (a segment of a row) counts when every masked token is `correct` [B, L].
  Teacher-forced, so it equals greedy decoding of the answer. Returns (correct samples, samples)."""
  b, l = correct.shape
  max_segments = l + 1
  sample = (jnp.arange(b)[:, None] * max_segments + segment_ids).reshape(-1)
  wrong = (~correct & (mask > 0)).reshape(-1).astype(jnp.int32)
  has_loss = (mask > 0).reshape(-1).astype(jnp.int32)
  n = b * max_segments
  any_wrong = jax.ops.segment_max(wrong, sample, num_segments=n)
  any_loss = jax.ops.segment_max(has_loss, sample, num_segments=n)
  any_wrong = jnp.maximum(any_wrong, 0)
  any_loss = jnp.maximum(any_loss, 0)
  return jnp.sum(any_loss * (1 - any_wrong)), jnp.sum(any_loss)
