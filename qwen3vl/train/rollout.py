"""Rollouts for post-training: G answers sampled to each of P prompts by the compiled `generate` (one program for
the whole P x G batch), scored by the rewards, and turned into training rows for the Packer.

A training row is the prompt followed by the answer's token ids as sampled (not re-tokenized from the decoded
text, which could differ), its stop token included when one ended it, with the loss on the answer: the policy
update then scores exactly the tokens the policy chose. Rows are one per answer (the Packer with pack=False), in
prompt-major order, so row r is prompt r // G's answer r % G.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from qwen3vl.data.datasets import Sample, SampleBuilder
from qwen3vl.infer.assistant import stack_inputs
from qwen3vl.infer.generate import generate
from qwen3vl.train import rewards as rewards_lib


@dataclasses.dataclass
class Rollout:
  records: list[dict]              # the P prompts' records
  prompts: list[Sample]            # their prompts (no loss)
  answers: list[list[int]]         # P * G answers' token ids as sampled (stop token kept), prompt-major
  texts: list[str]                 # the answers decoded (special tokens skipped)
  rewards: dict[str, np.ndarray]   # reward name -> [P, G]
  seconds: float                   # sampling and scoring time

  @property
  def total(self) -> np.ndarray:
    """[P, G] the answers' rewards (the sum of the chosen ones)."""
    return sum(self.rewards.values())

  def metrics(self) -> dict:
    """Mean rewards, answer length, and the share of groups whose rewards differ (the others teach nothing)."""
    return {"rl/reward": float(self.total.mean()),
            **{f"rl/reward_{k}": float(x.mean()) for k, x in self.rewards.items()},
            "rl/answer_tokens": float(np.mean([len(a) for a in self.answers])),
            "rl/mixed_groups": float((self.total.max(-1) > self.total.min(-1)).mean())}


def prompt_inputs(prompt: Sample) -> dict:
  """One prompt as `generate` takes it: input_ids [1, L] and its vision arrays."""
  out = {"input_ids": prompt.input_ids[None]}
  if len(prompt.image_grid_thw):
    out["pixel_values"], out["image_grid_thw"] = prompt.image_pixels, prompt.image_grid_thw
  if len(prompt.video_grid_thw):
    out["pixel_values_videos"], out["video_grid_thw"] = prompt.video_pixels, prompt.video_grid_thw
  return out


def vision_ids(tokenizer) -> list[int]:
  """The vision placeholder tokens: never sampled into an answer (a training row holding one would not match its
  images). The update's log-probs are the model's own over all tokens; the suppressed ones carry a negligible
  share of a trained model's mass."""
  ids = tokenizer.special_ids
  return [ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
          if k in ids]


def until_stop(tokens, stop_ids) -> list[int]:
  """A row of generated tokens up to and including its first stop token (all of it when none came)."""
  row = [int(t) for t in tokens]
  for k, t in enumerate(row):
    if t in stop_ids:
      return row[:k + 1]
  return row


def sample(model, builder: SampleBuilder, records: list[dict], prompts: list[Sample], rewards: dict, *, group: int,
           max_new_tokens: int, temperature: float, top_p: float | None, rng, stop_ids, pad_id: int,
           mesh=None) -> Rollout:
  """`group` answers to each record's prompt (`SampleBuilder.prompt`), sampled together in one left-padded batch,
  and their rewards.
  The rewards read the answer as the model wrote it: only a closing <|im_end|> is taken off; any other special
  token (an <|endoftext|> that stopped it, say) stays in the text, so an answer the chat template would not
  close does not match. With a `mesh` the batch is decoded sharded over its data axes (generate's `mesh`)."""
  start = time.perf_counter()
  batch = stack_inputs([prompt_inputs(p) for p in prompts for _ in range(group)], pad_id)
  tokens = generate(model, **batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, rng=rng,
                    stop_ids=stop_ids, pad_id=pad_id, mesh=mesh, suppress_ids=vision_ids(builder.tokenizer))
  answers = [until_stop(row, stop_ids) for row in tokens]
  end = builder.tokenizer.special_ids["im_end"]
  texts = [builder.tokenizer.decode(a[:-1] if a and a[-1] == end else a, skip_special_tokens=False)
           for a in answers]
  scores = [rewards_lib.score(rewards, records[i // group], text) for i, text in enumerate(texts)]
  by_name = {name: np.asarray([s[name] for s in scores], np.float32).reshape(len(records), group)
             for name in rewards}
  return Rollout(records, prompts, answers, texts, by_name, time.perf_counter() - start)


class Sampler:
  """`sample` with a post-training config's `rl` fields (group, max_new_tokens, temperature, top_p, rewards)."""

  def __init__(self, rl, builder: SampleBuilder, mesh=None):
    self.rl, self.builder, self.mesh = rl, builder, mesh
    self.rewards = rewards_lib.select(rl.rewards)
    ids = builder.tokenizer.special_ids
    self.stop_ids, self.pad_id = sorted({ids["im_end"], ids["pad"]}), ids["pad"]

  def __call__(self, model, records: list[dict], prompts: list[Sample], key) -> Rollout:
    r = self.rl
    return sample(model, self.builder, records, prompts, self.rewards, group=r.group,
                  max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p or None, rng=key,
                  stop_ids=self.stop_ids, pad_id=self.pad_id, mesh=self.mesh)


def training_rows(builder: SampleBuilder, rollout: Rollout) -> list[Sample]:
  """Each answer after its prompt, the loss on the answer's tokens, prompt-major (row r: prompt r // G)."""
  group = len(rollout.answers) // len(rollout.prompts)
  return [builder.answered(rollout.prompts[i // group], answer) for i, answer in enumerate(rollout.answers)]
