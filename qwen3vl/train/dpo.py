"""DPO (the loop: train/posttrain.py): `python train.py --config=configs/dpo.py --config.init_from=DIR`.

Pairs come from one of two places:
* `rl.pairs=FILE.jsonl`: lines {"image" or "images", "prompt" (or "conversations" up to the user turn), "chosen",
  "rejected"}, image paths relative to the file;
* no file: built on the fly from the training set: `rl.group` answers sampled to each prompt by the policy being
  trained, scored by `rl.rewards`, the best the chosen and the worst the rejected. A prompt whose answers all scored
  the same gives no pair (weight 0 in the loss), so the batch keeps its shape.
Each pair is two rows, chosen then rejected; the loss is DPO's on sequence log-probs against the frozen starting
weights (policy_losses.dpo_loss, `rl.beta`).
"""
from __future__ import annotations

import numpy as np

from qwen3vl.data.datasets import JsonlSource, SampleBuilder, SkipSample
from qwen3vl.train import posttrain, rollout
from qwen3vl.train.policy_losses import dpo_loss, sequence_logprobs


def dpo_objective(logits, logp, batch, config):
  """DPO over the batch's (chosen, rejected) row pairs."""
  del logits
  mask = batch["loss_mask"]
  policy = sequence_logprobs(logp, mask).reshape(-1, 2)
  reference = sequence_logprobs(batch["ref_logp"], mask).reshape(-1, 2)
  return dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=config.rl.beta,
                  weights=batch["pair_weight"].reshape(-1, 2)[:, 0])


class PairSource:
  """A pairs JSONL file as records the SampleBuilder can prompt: "prompt" becomes the user turn (the images go
  in front of it, as in SFT records), and "chosen" / "rejected" stay as they are."""

  def __init__(self, path: str):
    self.jsonl = JsonlSource(path)

  def __len__(self) -> int:
    return len(self.jsonl)

  def __getitem__(self, index: int) -> dict:
    record = self.jsonl[index]
    missing = [k for k in ("chosen", "rejected") if not isinstance(record.get(k), str)]
    if missing or not ("prompt" in record or "conversations" in record or "messages" in record):
      raise SkipSample("bad_record", f"{self.jsonl.path} line {index + 1}: a pair needs 'prompt' (or "
                       f"'conversations'), 'chosen' and 'rejected' strings; missing {missing or ['prompt']}")
    if "prompt" in record:
      record["conversations"] = [{"from": "human", "value": record["prompt"]}]
    return record


class DPO:
  """The DPO method of the post-training loop: rows are (chosen, rejected) pairs, each pair with its weight."""
  loss_fn = staticmethod(posttrain.loss_fn(dpo_objective))
  needs_old_logp = False
  logged = {"objective": "dpo/loss", "reward_accuracy": "dpo/reward_accuracy", "margin": "dpo/margin"}

  @staticmethod
  def rows_per_prompt(config) -> int:
    return 2

  @staticmethod
  def validate(config):
    r = config.rl
    sampled = not r.pairs
    for name, ok in (("rl.beta", r.beta > 0), ("rl.group", not sampled or r.group >= 2),
                     ("rl.max_new_tokens", not sampled or r.max_new_tokens >= 1)):
      if not ok:
        raise ValueError(f"invalid config field {name}: {r[name.split('.')[1]]!r}")

  def __init__(self, config, builder: SampleBuilder, mesh=None):
    self.config, self.builder = config.rl, builder
    self.sampler = None if config.rl.pairs else rollout.Sampler(config.rl, builder, mesh)
    self.needs_reference = True

  def source(self, default):
    return PairSource(self.config.pairs) if self.config.pairs else default

  def answer_ids(self, text: str) -> list[int]:
    return self.builder.tokenizer.encode(text) + [self.builder.tokenizer.special_ids["im_end"]]

  def prompt(self, record):
    """The record's prompt; a pair whose chosen or rejected row would not fit data.max_length is passed over."""
    prompt = self.builder.prompt(record)
    if self.sampler is None:
      for key in ("chosen", "rejected"):
        self.builder.answered(prompt, self.answer_ids(record[key]))  # raises SkipSample
    return prompt

  def rows(self, model, records, prompts, key):
    """(2 rows a prompt, chosen then rejected; {"pair_weight": per row}; metrics)."""
    if self.sampler is None:
      answers = [self.answer_ids(r[k]) for r in records for k in ("chosen", "rejected")]
      weights, metrics = np.ones(len(answers), np.float32), {}
    else:
      out = self.sampler(model, records, prompts, key)
      group, total = self.config.group, out.total
      best, worst = total.argmax(-1), total.argmin(-1)
      answers = [out.answers[p * group + i] for p in range(len(records)) for i in (best[p], worst[p])]
      weights = np.repeat(total.max(-1) > total.min(-1), 2).astype(np.float32)
      metrics = out.metrics()
    rows = [self.builder.answered(prompts[k // 2], a) for k, a in enumerate(answers)]
    return rows, {"pair_weight": weights}, metrics
