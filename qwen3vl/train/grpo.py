"""GRPO post-training: `python train.py --config=configs/grpo.py --config.init_from=WORKDIR_OR_HF_DIR`.

Each step takes `rl.prompts` records, samples `rl.group` answers to each with the compiled `generate` (one
program over prompts x group, temperature / top-p), scores them with the rewards named in `rl.rewards`
(train/rewards.py), normalises each group's rewards into advantages, and makes `rl.updates` updates of the
clipped-ratio objective (train/policy_losses.py) on those rows: the first against log-probs recomputed before
it, a KL penalty to the frozen starting weights when `rl.kl_coef` > 0. The update is train.py's TrainStep with
this loss, so LoRA, meshes, remat and host offload work as in SFT; checkpoints hold the train state (its `rng`
seeds every rollout: rollout i samples with fold_in(rng, i)) and the prompt position, so a resumed run samples
what the uninterrupted one would have. Evaluation is SFT's (teacher-forced exact match on the held-out set).

No answer labels are used for training: the exact-match reward reads the record's reference answer.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3vl import distributed
from qwen3vl.data.datasets import SampleBuilder, SkipSample
from qwen3vl.data.packing import to_model_inputs
from qwen3vl.train import adapters, losses, rewards as rewards_lib, rollout as rollout_lib, trainer
from qwen3vl.train.metrics import MetricsWriter
from qwen3vl.train.optim import schedule
from qwen3vl.train.policy_losses import group_advantages, grpo_loss, token_logprobs


def answer_logprobs(graphdef, params, batch) -> jax.Array:
  """[B, L] log-probs of the batch's targets under the model with `params` (float32)."""
  logits, _ = nnx.merge(graphdef, params).forward(to_model_inputs(batch))
  return token_logprobs(logits, batch["targets"])


def grpo_loss_fn(graphdef, params, batch, config):
  """TrainStep's loss: the GRPO objective on the batch's answer tokens (+ the MoE load-balancing terms of SFT)."""
  model = nnx.merge(graphdef, params)
  logits, extras = model.forward(to_model_inputs(batch))
  logp = token_logprobs(logits, batch["targets"])
  loss, metrics = grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["loss_mask"],
                            clip_eps=config.rl.clip_eps, kl_coef=config.rl.kl_coef)
  metrics["objective"] = loss
  if extras["router_logits"] is not None:
    aux, z, _ = losses.moe_losses(extras["router_logits"], (batch["segment_ids"] > 0).reshape(-1),
                                  model.config.text.num_experts_per_tok)
    loss = loss + config.loss.aux_loss_coef * aux + config.loss.z_loss_coef * z
  metrics["loss"] = loss
  return loss, metrics


class Prompts:
  """The records to answer, in a seeded order reshuffled every epoch, each with its prompt; a record that cannot
  be one (too long, a bad image) is passed over. `position` (records taken) is the data state a checkpoint keeps."""

  def __init__(self, source, builder: SampleBuilder, seed: int, position: int = 0):
    self.source, self.builder, self.seed, self.position = source, builder, seed, position

  def take(self, n: int) -> tuple[list[dict], list]:
    """(n records, their prompts)."""
    records, prompts = [], []
    while len(records) < n:
      epoch, i = divmod(self.position, len(self.source))
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
      self.position += 1
      record = self.source[int(order[i])]
      try:
        prompts.append(self.builder.prompt(record))
      except SkipSample:
        continue
      records.append(record)
    return records, prompts


def validate(config):
  r = config.rl
  if r.algorithm != "grpo":
    raise ValueError(f"invalid config field rl.algorithm: {r.algorithm!r} (grpo; dpo: configs/dpo.py)")
  for name, ok in (("rl.group", r.group >= 2), ("rl.prompts", r.prompts >= 1), ("rl.updates", r.updates >= 1),
                   ("rl.max_new_tokens", r.max_new_tokens >= 1), ("rl.clip_eps", r.clip_eps > 0),
                   ("rl.kl_coef", r.kl_coef >= 0), ("data.pack", not config.data.pack),
                   ("data.batch_size", config.data.batch_size == r.prompts * r.group)):
    if not ok:
      raise ValueError(f"invalid config field {name}: {config[name.split('.')[0]][name.split('.')[1]]!r} "
                       f"(GRPO rows: one answer each, data.batch_size = rl.prompts x rl.group)")
  if jax.process_count() > 1:
    raise ValueError("GRPO runs in one process for now (its rollouts are not split over hosts)")


def train(config, workdir: str) -> dict:
  """Runs (or resumes) GRPO in `workdir`; returns the last eval metrics."""
  validate(config)
  run = trainer.setup(config, workdir)
  cfg, graphdef, frozen, mesh, r = run.cfg, run.graphdef, run.frozen, run.mesh, config.rl
  # SFT's data set-up: its train loader's source, builder and packer (one answer a row: data.pack is False)
  # serve the prompts and the rows; it is not iterated.
  loader, make_eval = trainer.make_loaders(config, run.tokenizer, cfg)
  builder = loader.builder
  prompts = Prompts(loader.source, builder, config.seed, (run.data_state or {}).get("position", 0))
  chosen = rewards_lib.select(r.rewards)
  ids = run.tokenizer.special_ids
  stop_ids, pad_id = sorted({ids["im_end"], ids["pad"]}), ids["pad"]
  # The reference of the KL term: the starting weights (rebuilt, so a resumed run has the same reference).
  reference = (adapters.join(trainer.initial_params(config, cfg, trainer.source(config))[1], frozen)
               if r.kl_coef else None)

  step_fn = trainer.TrainStep(graphdef, run.tx, config, run.shardings, mesh, loss_fn=grpo_loss_fn)
  logprobs = jax.jit(functools.partial(answer_logprobs, graphdef))
  jit_eval = jax.jit(functools.partial(trainer.eval_step, graphdef=graphdef, config=config))
  eval_fn = lambda params, batch: jit_eval(params, frozen, batch)  # noqa: E731
  lr = schedule(config.optim, config.train.steps)
  state, ckpt = run.state, run.ckpt
  start = int(state["step"]) // r.updates
  writer = MetricsWriter(workdir, config.train.steps, start, enabled=run.primary)
  merge = cfg.vision.spatial_merge_size
  last_eval = {}
  stop = trainer.StopSignal()  # SIGTERM / Ctrl-C: checkpoint at the step reached, then exit
  try:
    for i in range(start, config.train.steps):
      if stop.requested:
        writer.print(f"stop requested: saving a checkpoint at step {i}")
        break
      records, asked = prompts.take(r.prompts)
      key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), i)
      model = nnx.merge(graphdef, adapters.join(state["params"], frozen))
      out = rollout_lib.sample(model, builder, records, asked, chosen, group=r.group,
                               max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p or None,
                               rng=key, stop_ids=stop_ids, pad_id=pad_id)
      update_start = time.perf_counter()
      batch = _rows(builder, loader.packer.clone(), out)
      batch["advantages"] = group_advantages(jnp.asarray(out.total)).reshape(-1)
      batch = distributed.global_batch(batch, mesh, merge)
      with jax.set_mesh(mesh):
        whole = adapters.join(state["params"], frozen)
        batch["old_logp"] = logprobs(whole, batch)
        batch["ref_logp"] = logprobs(reference, batch) if reference is not None else batch["old_logp"]
      metrics = []
      for _ in range(r.updates):
        state, m = step_fn(state, batch, frozen)
        metrics.append(m)
      m = jax.device_get(metrics)
      record = {"rl/reward": float(out.total.mean()),
                **{f"rl/reward_{k}": float(x.mean()) for k, x in out.rewards.items()},
                "rl/answer_tokens": float(np.mean([len(a) for a in out.answers])),
                "rl/kl": float(np.mean([x["kl"] for x in m])),
                "rl/clip_fraction": float(np.mean([x["clip_fraction"] for x in m])),
                "rl/objective": float(np.mean([x["objective"] for x in m])),
                "train/grad_norm": float(np.mean([x["grad_norm"] for x in m])),
                "train/lr": float(lr(int(state["step"]))), "time/rollout_s": out.seconds,
                "time/update_s": time.perf_counter() - update_start}
      writer.advance()
      if (i + 1) % config.train.log_every == 0 or i + 1 == config.train.steps:
        writer.write(i + 1, record)
      if (i + 1) % config.train.checkpoint_every == 0:
        ckpt.save(int(state["step"]), state, {"position": prompts.position}, base=run.base_item)
      if make_eval and ((i + 1) % config.train.eval_every == 0 or i + 1 == config.train.steps):
        last_eval = trainer.evaluate(eval_fn, state["params"], make_eval, config.train.eval_batches, mesh, merge)
        writer.write(i + 1, last_eval)
        writer.print(f"step {i + 1}: " + ", ".join(f"{k}={x:.4g}" for k, x in last_eval.items()))
    if ckpt.latest_step() != int(state["step"]):
      ckpt.save(int(state["step"]), state, {"position": prompts.position}, base=run.base_item, force=True)
    ckpt.wait()
  finally:
    stop.restore()
    writer.close()
    ckpt.close()
  return last_eval


def _rows(builder, packer, out) -> dict:
  """The rollout's P x G training rows as one batch of `packer` (one answer a row, prompt-major)."""
  for row, sample in enumerate(rollout_lib.training_rows(builder, out)):
    if not packer.add(sample):
      raise ValueError(f"GRPO row {row} does not fit the batch: raise data.max_length (needs prompt + "
                       f"rl.max_new_tokens = {sample.length}) or data.max_patches")
  return packer.flush()
