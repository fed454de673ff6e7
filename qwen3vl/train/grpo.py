"""GRPO (the loop: train/posttrain.py): `python train.py --config=configs/grpo.py --config.init_from=DIR`.

Each step samples `rl.group` answers to each of `rl.prompts` records with the compiled `generate` (one program
over prompts x group, temperature / top-p), scores them with the rewards named in `rl.rewards`
(train/rewards.py), normalises each group's rewards into advantages, and makes `rl.updates` updates of the
clipped-ratio objective (train/policy_losses.py) on those rows: the first against the log-probs recomputed before
it, a KL penalty to the frozen starting weights when `rl.kl_coef` > 0.

No answer labels are used for training: the exact-match reward reads the record's reference answer.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qwen3vl.data.datasets import SampleBuilder
from qwen3vl.train import posttrain, rollout as rollout_lib
from qwen3vl.train.policy_losses import answer_entropy, group_advantages, grpo_loss


def grpo_objective(logits, logp, batch, config):
  """The GRPO objective on the batch's answer tokens, and the answers' entropy."""
  loss, metrics = grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["loss_mask"],
                            clip_eps=config.rl.clip_eps, kl_coef=config.rl.kl_coef)
  return loss, {**metrics, "entropy": answer_entropy(logits, batch["loss_mask"])}


class GRPO:
  """The GRPO method of the post-training loop: rows are the sampled answers, each with its advantage."""
  loss_fn = staticmethod(posttrain.loss_fn(grpo_objective))
  needs_old_logp = True
  # The loss's metrics logged (averaged over the step's updates), by their names in metrics.jsonl.
  logged = {"kl": "rl/kl", "clip_fraction": "rl/clip_fraction", "objective": "rl/objective", "entropy": "rl/entropy"}

  @staticmethod
  def rows_per_prompt(config) -> int:
    return config.rl.group

  @staticmethod
  def validate(config):
    r = config.rl
    for name, ok in (("rl.group", r.group >= 2), ("rl.max_new_tokens", r.max_new_tokens >= 1),
                     ("rl.clip_eps", r.clip_eps > 0), ("rl.kl_coef", r.kl_coef >= 0),
                     ("rl.advantage", r.advantage in ("std", "mean", "none"))):
      if not ok:
        raise ValueError(f"invalid config field {name}: {r[name.split('.')[1]]!r}")

  def __init__(self, config, builder: SampleBuilder, mesh=None):
    self.builder, self.sample = builder, rollout_lib.Sampler(config.rl, builder, mesh)
    self.needs_reference = config.rl.kl_coef > 0
    self.scale = config.rl.advantage

  def source(self, default):
    return default

  def prompt(self, record):
    return self.builder.prompt(record)

  def rows(self, model, records, prompts, key):
    """(the P x G rows, {"advantages": [P x G]}, the rollout's metrics)."""
    out = self.sample(model, records, prompts, key)
    advantages = np.asarray(group_advantages(jnp.asarray(out.total), self.scale)).reshape(-1)
    return rollout_lib.training_rows(self.builder, out), {"advantages": advantages}, out.metrics()
