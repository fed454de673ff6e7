"""Rewards for post-training: plain Python callables `(record, answer) -> float`, registered by name.

`config.rl.rewards="exact_match,format"` picks them; a sampled answer's reward is their sum, and each is logged
apart. A record is what the data sources yield (the built-in synthetic task, or a JSONL line with its turns); the
reference answer is its `meta.answer`, else its last assistant turn. Register your own with `@register("name")`
in any module imported before training.
"""
from __future__ import annotations

import re
from typing import Callable

from qwen3vl.data.datasets import to_messages

Reward = Callable[[dict, str], float]
REWARDS: dict[str, Reward] = {}


def register(name: str):
  """Decorator: `@register("my_reward") def my_reward(record, answer) -> float`."""
  def add(fn: Reward) -> Reward:
    if name in REWARDS:
      raise ValueError(f"reward {name!r} is already registered (by {REWARDS[name].__module__})")
    REWARDS[name] = fn
    return fn
  return add


def select(names: str) -> dict[str, Reward]:
  """"exact_match,format" -> {name: fn}; an unknown name is an error that lists the registered ones."""
  chosen = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in chosen if n not in REWARDS]
  if unknown or not chosen:
    raise ValueError(f"config.rl.rewards={names!r}: unknown {unknown or 'empty'}; registered: {sorted(REWARDS)}")
  return {n: REWARDS[n] for n in chosen}


def reference_answer(record: dict) -> str:
  """The record's reference answer: `meta.answer`, else the text of its last assistant turn."""
  meta = record.get("meta") or {}
  if "answer" in meta:
    return str(meta["answer"])
  replies = [m["content"] for m in to_messages(record) if m["role"] == "assistant"]
  if not replies:
    raise ValueError("the record has no reference answer (no meta.answer and no assistant turn)")
  return replies[-1]


def normalise(text: str) -> str:
  """Case, surrounding space and punctuation, and runs of spaces do not count."""
  return re.sub(r"\s+", " ", text.strip().strip(".!?,;:\"'").strip().lower())


@register("exact_match")
def exact_match(record: dict, answer: str) -> float:
  """1 when the answer is the reference answer (normalised), else 0."""
  return float(normalise(answer) == normalise(reference_answer(record)))


@register("format")
def answer_format(record: dict, answer: str) -> float:
  """1 for a non-empty one-line answer with no chat markup left in it, else 0."""
  del record
  text = answer.strip()
  return float(bool(text) and "\n" not in text and "<|" not in text)


def score(rewards: dict[str, Reward], record: dict, answer: str) -> dict[str, float]:
  """{name: reward} for one answer (the total is their sum)."""
  return {name: float(fn(record, answer)) for name, fn in rewards.items()}
