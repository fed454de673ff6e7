"""int8 KV cache against the compute-dtype cache on a trained model: answers, agreement, memory, speed.

    python train.py --config=configs/moe.py && python benchmarks/kv_cache_int8.py --checkpoint=workdir

Asks the held-out synthetic questions (the split train.py evaluates on) through `Assistant.replies`, generated
end to end (prefill, then the compiled decode loop; not teacher-forced), once with each cache, batch by batch
alternating the two, and prints exact-match accuracy of each, how often the two answers are the same, the cache
bytes per token, and the time of each.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default="workdir")
  parser.add_argument("--questions", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()

  from qwen3vl.data.synthetic import make_record
  from qwen3vl.infer.assistant import Assistant, user_turn
  from qwen3vl.model.kv_cache import KVCache

  assistants = {kv: Assistant(args.checkpoint, kv_cache=kv) for kv in ("auto", "int8")}
  records = [make_record("eval", i) for i in range(args.questions)]
  answers = {kv: [] for kv in assistants}
  seconds = {kv: 0.0 for kv in assistants}
  for start in range(0, len(records), args.batch):
    batch = records[start:start + args.batch]
    conversations = [([user_turn(r["conversations"][0]["value"][len("<image>\n"):], 1)], r["images"], [])
                     for r in batch]
    for kv, assistant in assistants.items():
      if start == 0:  # compile outside the timing
        assistant.replies(conversations, max_new_tokens=8)
      t0 = time.perf_counter()
      answers[kv] += [r.text.strip() for r in assistant.replies(conversations, max_new_tokens=8)]
      seconds[kv] += time.perf_counter() - t0
  truth = [r["meta"]["answer"] for r in records]
  t = assistants["auto"].model.config.text
  per_token = {kv: KVCache.empty(t.num_hidden_layers, 1, 1, t.num_key_value_heads, t.head_dim,
                                 assistants[kv].model.config.dtype, kv).nbytes() for kv in assistants}
  em = {kv: float(np.mean([a == b for a, b in zip(answers[kv], truth)])) for kv in assistants}
  same = float(np.mean([a == b for a, b in zip(answers["auto"], answers["int8"])]))
  print(f"{args.checkpoint}: {len(records)} held-out questions, greedy, batch {args.batch}")
  print("| KV cache | exact match | bytes / token | time (s) |\n|---|---|---|---|")
  for kv in assistants:
    print(f"| {kv} ({per_token[kv] // (t.num_hidden_layers * t.num_key_value_heads)} B per layer and kv head) | "
          f"{em[kv]:.3f} | {per_token[kv]} | {seconds[kv]:.2f} |")
  print(f"same answer with both caches: {same:.3f}")


if __name__ == "__main__":
  main()
