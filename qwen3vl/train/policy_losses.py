"""Objectives of post-training with rewards and preferences, over per-token log-probabilities of answers.

GRPO (Shao et al. 2024, DeepSeekMath): G answers sampled per prompt, each answer's advantage its reward
normalised within its group; the clipped importance-ratio surrogate of PPO against the policy that sampled
(`old_logp`), minus `kl_coef` x the k3 estimate of KL(policy || reference), exp(r - p) - (r - p) - 1 (>= 0, 0 where
they agree). The per-token terms are averaged over every answer token of the batch (DAPO's token mean): a long
answer weighs by its tokens, and an answer's length does not rescale its tokens' gradients.

DPO (Rafailov et al. 2023): -log sigmoid(beta x ((chosen - ref chosen) - (rejected - ref rejected))) over
sequence log-probabilities (sums over the answer tokens).

Pure functions of arrays: the trainers feed them log-probs from the model (`token_logprobs`) and the tests from
hand-built numbers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets) [B, L] (float32) from next-token logits [B, L, V] (position t predicts targets[t])."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def answer_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean entropy (nats) of the next-token distributions at the answer tokens: a policy collapsing onto one answer
  shows it falling."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  entropy = -(jnp.exp(logp) * logp).sum(-1)
  mask = mask.astype(jnp.float32)
  return (entropy * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def group_advantages(rewards: jax.Array, scale: str = "std", eps: float = 1e-4) -> jax.Array:
  """rewards [P, G] (G answers to each of P prompts) -> (r - group mean) / the group's scale; a group whose
  answers all scored the same gets 0 (nothing to learn from it). Scales:
  * "std": GRPO's group standard deviation.
  * "mean": the group mean (rewards >= 0). For a 0/1 reward a prompt's expected update is then
    (1 - (1 - p)^(G - 1)) x the gradient of log p(right answer), p its chance: SFT's gradient without the labels,
    except for prompts too hard for the group. A policy that cannot yet tell prompts apart stays calibrated
    instead of collapsing onto its commonest answer (what maximising E[reward] does), and hard prompts weigh as
    much as nearly solved ones ("std" weighs a prompt by about sqrt(p / (1 - p)))
  * "none": the centred reward (Dr. GRPO)."""
  rewards = rewards.astype(jnp.float32)
  centred = rewards - rewards.mean(-1, keepdims=True)
  if scale == "none":
    return centred
  if scale not in ("std", "mean"):
    raise ValueError(f"invalid config field rl.advantage: {scale!r} (std, mean or none)")
  by = rewards.std(-1, keepdims=True) if scale == "std" else rewards.mean(-1, keepdims=True)
  return centred / (by + eps)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps: float = 0.2, kl_coef: float = 0.04):
  """logp, old_logp, ref_logp [B, L] log-probs of the answer tokens under the policy being trained, the policy
  that sampled them and the frozen reference; advantages [B] (one per answer); mask [B, L] answer tokens.
  Returns (loss, {"kl", "clip_fraction"}), both means over answer tokens."""
  mask = mask.astype(jnp.float32)
  tokens = jnp.maximum(mask.sum(), 1.0)
  mean = lambda x: (x * mask).sum() / tokens  # noqa: E731
  a = advantages.astype(jnp.float32)[:, None]
  ratio = jnp.exp(logp - jax.lax.stop_gradient(old_logp))
  surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
  gap = jax.lax.stop_gradient(ref_logp) - logp
  kl = jnp.exp(gap) - gap - 1.0
  clipped = ((a > 0) & (ratio > 1.0 + clip_eps)) | ((a < 0) & (ratio < 1.0 - clip_eps))
  return mean(kl_coef * kl - surrogate), {"kl": mean(kl), "clip_fraction": mean(clipped)}


def sequence_logprobs(logp: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, L] token log-probs -> [B]: the answer's log-probability (sum over its tokens)."""
  return (logp * mask.astype(logp.dtype)).sum(-1)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta: float = 0.1, weights=None):
  """Sequence log-probs [N] of the chosen and rejected answers under the policy and the frozen reference ->
  (mean loss, {"reward_accuracy": share of pairs whose implicit reward ranks chosen first, "margin": mean
  beta-scaled margin}); `weights` [N] (0 for a pair that is not one) make every mean a weighted one."""
  stop = jax.lax.stop_gradient
  margin = beta * ((chosen - stop(ref_chosen)) - (rejected - stop(ref_rejected)))
  w = jnp.ones_like(margin) if weights is None else weights.astype(margin.dtype)
  mean = lambda x: (x * w).sum() / jnp.maximum(w.sum(), 1e-9)  # noqa: E731
  return mean(-jax.nn.log_sigmoid(margin)), {"reward_accuracy": mean(margin > 0), "margin": mean(margin)}
