"""Adaptive-depth and efficiency switches on a trained model, against the same model without them (CPU).

    python train.py --config=configs/moe.py --config.model.text.num_hidden_layers=4 --workdir=runs/l4
    python benchmarks/adaptive.py --checkpoint=runs/l4 --exit_layers=1,2 --thresholds=1.0,0.99,0.9

Early exit (`exit_layers`, `exit_threshold`): the held-out synthetic questions answered greedily one at a time
(batch 1: a decode step whose token exits skips the remaining layers' compute), for each threshold: exact match,
answers equal to the full-depth answers, decoder layers run per decoded answer token, and on a fixed-length
continuation (`--new` tokens without stopping: the answer, then whatever the model says after it) the layers per
token and decode tokens/s (prefill excluded, median over the questions).
Cross-layer sharing is measured by training (see RESULTS.md); the other switches of the issue are not built yet.
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
  parser.add_argument("--questions", type=int, default=128)
  parser.add_argument("--exit_layers", default="1,2")
  parser.add_argument("--thresholds", default="1.0,0.99,0.9")
  parser.add_argument("--new", type=int, default=32, help="tokens decoded for the speed measurement")
  args = parser.parse_args()

  import jax
  from qwen3vl.data.synthetic import make_record
  from qwen3vl.infer import generate
  from qwen3vl.infer.assistant import Assistant, user_turn
  from qwen3vl.model.vlm import with_runtime

  assistant = Assistant(args.checkpoint)
  full = assistant.model
  layers = full.config.text.num_hidden_layers
  exit_layers = tuple(int(i) for i in args.exit_layers.split(","))
  records = [make_record("eval", i) for i in range(args.questions)]
  prompts = [assistant.inputs([user_turn(r["conversations"][0]["value"][len("<image>\n"):], 1)], r["images"])
             for r in records]
  truth = [r["meta"]["answer"] for r in records]
  stop = list(assistant.stop_ids)
  print(f"{args.checkpoint}: {layers} decoder layers, exits after {exit_layers}, {len(records)} held-out questions")
  print("| threshold | exact match | same answer as full depth | layers / answer token | layers / continuation "
        "token | decode tokens/s |")
  print("|---|---|---|---|---|---|")
  reference = None
  for threshold in [float(t) for t in args.thresholds.split(",")]:
    model = with_runtime(full, exit_layers=exit_layers, exit_threshold=threshold)
    answers, depth, steps, rates, continued = [], 0, 0, [], 0
    for p in prompts:
      tokens, state = generate(model, **p, max_new_tokens=8, stop_ids=stop, pad_id=assistant.pad_id,
                               return_state=True)
      row = [int(t) for t in tokens[0] if t not in stop and t != assistant.pad_id]
      answers.append(assistant.tokenizer.decode(row).strip())
      depth += int(state.layers[0])
      steps += max(len(row), 1) - 1 + int(any(t in stop for t in tokens[0]))  # decode steps (prefill made token 0)
      generate(model, **p, max_new_tokens=args.new)  # compiled: time the next call
      t0 = time.perf_counter()
      _, long_state = jax.block_until_ready(generate(model, **p, max_new_tokens=args.new, return_state=True))
      t1 = time.perf_counter()
      continued += int(long_state.layers[0])
      generate(model, **p, max_new_tokens=1)
      t2 = time.perf_counter()
      jax.block_until_ready(generate(model, **p, max_new_tokens=1))
      prefill = time.perf_counter() - t2
      rates.append((args.new - 1) / max(t1 - t0 - prefill, 1e-9))
    reference = reference or answers
    em = np.mean([a == b for a, b in zip(answers, truth)])
    same = np.mean([a == b for a, b in zip(answers, reference)])
    print(f"| {threshold:g} | {em:.3f} | {same:.3f} | {depth / max(steps, 1):.2f} of {layers} | "
          f"{continued / (len(prompts) * (args.new - 1)):.2f} | {np.median(rates):.0f} |")


if __name__ == "__main__":
  main()
