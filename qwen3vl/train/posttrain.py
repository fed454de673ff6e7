"""Post-training with rewards or preferences: `python train.py --config=configs/grpo.py --config.init_from=DIR`
(or configs/dpo.py), DIR an SFT work directory or a HF Qwen3-VL directory.

One loop for both methods (train/grpo.py, train/dpo.py). Each step takes `rl.prompts` records; the method turns
them into training rows (GRPO: `rl.group` answers sampled to each by the compiled `generate`, with their
advantages; DPO: a chosen and a rejected answer to each, from the records or sampled and ranked by the rewards)
and the loop makes `rl.updates` updates on those rows with the method's loss. The log-probs of the rows under the
weights before the update (`old_logp`, GRPO) and under the frozen starting weights (`ref_logp`, when the method
needs a reference) are computed once per step. The update is train.py's TrainStep with the method's loss, so LoRA,
meshes, remat and host offload work as in SFT.

Checkpoints hold the train state (its `rng` seeds every rollout: step i samples with fold_in(rng, i)) and the
prompt position, so a resumed run samples what the uninterrupted one would have. Evaluation is SFT's
(teacher-forced exact match on the held-out set, which equals greedy decoding's).
"""
from __future__ import annotations

import functools
import time

import jax
import numpy as np
from flax import nnx

from qwen3vl import distributed
from qwen3vl.data.datasets import SkipSample
from qwen3vl.data.packing import to_model_inputs
from qwen3vl.train import adapters, trainer
from qwen3vl.train.metrics import MetricsWriter
from qwen3vl.train.optim import schedule
from qwen3vl.train.policy_losses import token_logprobs


def answer_logprobs(graphdef, params, batch) -> jax.Array:
  """[B, L] log-probs of the batch's targets under the model with `params` (float32)."""
  logits, _ = nnx.merge(graphdef, params).forward(to_model_inputs(batch))
  return token_logprobs(logits, batch["targets"])


def loss_fn(objective):
  """TrainStep's loss from a method's `objective(logits, logp, batch, config) -> (loss, metrics)`, logp the
  targets' log-probs: the model's forward, and its own terms (MoE balancing, MoD predictor; trainer.model_losses)
  added to the objective."""
  def loss(graphdef, params, batch, config):
    model = nnx.merge(graphdef, params)
    logits, extras = model.forward(to_model_inputs(batch))
    value, metrics = objective(logits, token_logprobs(logits, batch["targets"]), batch, config)
    own, model_metrics = trainer.model_losses(model, extras, batch, config)
    return value + own, {**metrics, **model_metrics, "objective": value, "loss": value + own}
  return loss


class Prompts:
  """The records to answer, in a seeded order reshuffled every epoch, each with its prompt (`prompt(record)`: a
  method's, SampleBuilder.prompt or stricter); a record that cannot be one (too long, a bad image) is passed over.
  `position` (records taken) is the data state a checkpoint keeps."""

  def __init__(self, source, prompt, seed: int, position: int = 0):
    self.source, self.prompt, self.seed, self.position = source, prompt, seed, position

  def take(self, n: int) -> tuple[list[dict], list]:
    """(n records, their prompts)."""
    records, prompts = [], []
    while len(records) < n:
      epoch, i = divmod(self.position, len(self.source))
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
      self.position += 1
      try:
        record = self.source[int(order[i])]
        prompts.append(self.prompt(record))
      except SkipSample:
        continue
      records.append(record)
    return records, prompts


def methods() -> dict:
  from qwen3vl.train import dpo, grpo
  return {"grpo": grpo.GRPO, "dpo": dpo.DPO}


def validate(config, rows_per_prompt: int):
  r = config.rl
  for name, ok in (("rl.prompts", r.prompts >= 1), ("rl.updates", r.updates >= 1), ("data.pack", not config.data.pack),
                   ("data.batch_size", config.data.batch_size == r.prompts * rows_per_prompt)):
    if not ok:
      raise ValueError(f"invalid config field {name}: {config[name.split('.')[0]][name.split('.')[1]]!r} "
                       f"(post-training rows: one answer each, data.batch_size = rl.prompts x "
                       f"{rows_per_prompt} rows per prompt)")
  if jax.process_count() > 1:
    raise ValueError("post-training runs in one process for now (its rollouts are not split over hosts)")


def train(config, workdir: str) -> dict:
  """Runs (or resumes) GRPO or DPO in `workdir`; returns the last eval metrics."""
  known = methods()
  if config.rl.algorithm not in known:
    raise ValueError(f"invalid config field rl.algorithm: {config.rl.algorithm!r} (one of {sorted(known)})")
  method_class = known[config.rl.algorithm]
  method_class.validate(config)
  validate(config, method_class.rows_per_prompt(config))
  run = trainer.setup(config, workdir)
  cfg, graphdef, frozen, mesh, r = run.cfg, run.graphdef, run.frozen, run.mesh, config.rl
  # SFT's data set-up: its train loader's builder and packer (one answer a row: data.pack is False) make the
  # rows; its source serves the prompts unless the method reads its own (DPO's pairs file). Not iterated.
  loader, make_eval = trainer.make_loaders(config, run.tokenizer, cfg)
  method = method_class(config, loader.builder, mesh)  # rollouts decode sharded over the mesh's data axes
  prompts = Prompts(method.source(loader.source), method.prompt, config.seed,
                    (run.data_state or {}).get("position", 0))
  # The reference: the starting weights (rebuilt, so a resumed run has the same reference).
  reference = (adapters.join(trainer.initial_params(config, cfg, trainer.source(config))[1], frozen)
               if method.needs_reference else None)

  step_fn = trainer.TrainStep(graphdef, run.tx, config, run.shardings, mesh, loss_fn=method.loss_fn)
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
      rollout_start = time.perf_counter()
      rows, per_row, record = method.rows(model, records, asked, key)
      update_start = time.perf_counter()
      batch = _batch(loader.packer.clone(), rows)
      batch.update(per_row)
      batch = distributed.global_batch(batch, mesh, merge)
      with jax.set_mesh(mesh):
        if method.needs_old_logp:
          batch["old_logp"] = logprobs(adapters.join(state["params"], frozen), batch)
        batch["ref_logp"] = logprobs(reference, batch) if reference is not None else batch["old_logp"]
      metrics = []
      for _ in range(r.updates):
        state, m = step_fn(state, batch, frozen)
        metrics.append(m)
      m = jax.device_get(metrics)
      record.update({name: float(np.mean([x[k] for x in m])) for k, name in method.logged.items()})
      record.update({"train/grad_norm": float(np.mean([x["grad_norm"] for x in m])),
                     "train/lr": float(lr(int(state["step"]))), "time/rollout_s": update_start - rollout_start,
                     "time/update_s": time.perf_counter() - update_start})
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


def _batch(packer, rows) -> dict:
  """The step's rows as one batch of `packer` (one answer a row, in order)."""
  for row, sample in enumerate(rows):
    if not packer.add(sample):
      raise ValueError(f"post-training row {row} does not fit the batch: raise data.max_length (needs prompt + "
                       f"answer = {sample.length}) or data.max_patches")
  return packer.flush()
