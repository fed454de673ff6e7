"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping, no weight decay on norms and biases,
per-group learning-rate multipliers (vision tower / mergers / LLM; 0 freezes a group), gradient accumulation.

Parameters are plain nested dicts (`nnx.to_pure_dict`), so groups are chosen by path: the first path element
`visual` is the vision tower, except its `merger` and `deepstack_mergers`; everything else is the LLM.
"""
from __future__ import annotations

import jax
import optax


def param_group(path: tuple[str, ...]) -> str:
  if path[0] == "visual":
    return "merger" if path[1] in ("merger", "deepstack_mergers") else "vision"
  return "llm"


def _no_decay(path: tuple[str, ...]) -> bool:
  return path[-1] in ("scale", "bias")


def _paths(tree, fn):
  return jax.tree_util.tree_map_with_path(lambda p, _: fn(tuple(str(getattr(k, "key", k)) for k in p)), tree)


def schedule(optim, steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
      decay_steps=max(steps, optim.warmup_steps + 1), end_value=optim.lr * optim.min_lr_ratio)


def make_optimizer(optim, steps: int, params) -> optax.GradientTransformation:
  """`optim` is the config's `optim` block; `params` a pure dict (only its structure is used)."""
  lr = schedule(optim, steps)
  groups = {}
  for name, mult in optim.lr_mult.items():
    if mult == 0:
      groups[name] = optax.set_to_zero()
    else:
      groups[name] = optax.adamw(lambda step, m=mult: lr(step) * m, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                 weight_decay=optim.weight_decay,
                                 mask=lambda p: _paths(p, lambda path: not _no_decay(path)))
  tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm),
                   optax.multi_transform(groups, _paths(params, param_group)))
  if optim.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum)
  return tx
