"""GRPO rollouts against `generate` alone, and the share of a GRPO step spent in them (CPU or any device).

    python benchmarks/rollout.py --checkpoint=sft [--prompts=16 --group=8 --rounds=10] [--run=grpo]

For `--rounds` batches of training prompts of the built-in task (configs/grpo.py's data set-up): the compiled
`generate` alone on the already stacked P x G batch, and the whole rollout (`rollout.sample`: stacking the
prompts, the same `generate`, decoding the answers, scoring them), timed interleaved after a warm-up, medians.
With `--run` (a GRPO work directory), the logged rollout and update seconds of its steps give the rollout's share.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen3vl.configs import grpo as grpo_config  # noqa: E402
from qwen3vl.infer.assistant import Assistant, stack_inputs  # noqa: E402
from qwen3vl.infer.generate import generate  # noqa: E402
from qwen3vl.train import posttrain, rollout, trainer  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="a train.py work directory (or HF directory)")
  parser.add_argument("--prompts", type=int, default=16)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--run", help="a GRPO work directory whose metrics.jsonl gives the rollout's share")
  args = parser.parse_args()

  config = grpo_config.get_config()
  config.rl.prompts, config.rl.group = args.prompts, args.group
  assistant = Assistant(args.checkpoint)
  model = assistant.model
  loader, _ = trainer.make_loaders(config, assistant.tokenizer, model.config)
  sampler = rollout.Sampler(config.rl, loader.builder)
  prompts = posttrain.Prompts(loader.source, loader.builder.prompt, config.seed)
  r = config.rl
  gen = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p or None,
             stop_ids=sampler.stop_ids, pad_id=sampler.pad_id, suppress_ids=rollout.vision_ids(assistant.tokenizer))

  def alone(asked, key):
    batch = stack_inputs([rollout.prompt_inputs(p) for p in asked for _ in range(r.group)], sampler.pad_id)
    start = time.perf_counter()
    generate(model, **batch, rng=key, **gen)  # numpy out: finished
    return time.perf_counter() - start

  def whole(records, asked, key):
    start = time.perf_counter()
    out = sampler(model, records, asked, key)
    return time.perf_counter() - start, out

  times = {"generate": [], "rollout": []}
  tokens = []
  for i in range(args.rounds + 1):  # round 0 compiles
    records, asked = prompts.take(r.prompts)
    key = jax.random.key(i)
    a = alone(asked, key)
    b, out = whole(records, asked, key)
    if i:
      times["generate"].append(a)
      times["rollout"].append(b)
      tokens.append(np.mean([len(x) for x in out.answers]))
  answers = r.prompts * r.group
  g, w = np.median(times["generate"]), np.median(times["rollout"])
  print(f"{args.checkpoint}: {r.prompts} prompts x {r.group} answers, max_new_tokens {r.max_new_tokens}, "
        f"{np.mean(tokens):.1f} answer tokens on average, {args.rounds} rounds ({jax.devices()[0].device_kind})")
  print(f"| generate alone | {g * 1e3:.1f} ms | {answers / g:.0f} answers/s |")
  print(f"| rollout (stack, generate, decode, score) | {w * 1e3:.1f} ms | {answers / w:.0f} answers/s |")
  print(f"rollout / generate alone: {w / g:.2f}")
  if args.run:
    with open(os.path.join(args.run, "metrics.jsonl")) as f:
      steps = [x for x in map(json.loads, f) if "time/rollout_s" in x][1:]  # the first step compiles
    rollout_s = np.median([x["time/rollout_s"] for x in steps])
    update_s = np.median([x["time/update_s"] for x in steps])
    print(f"{args.run}: median step {rollout_s + update_s:.3f} s = rollout {rollout_s:.3f} s + update "
          f"{update_s:.3f} s: rollouts {rollout_s / (rollout_s + update_s):.0%} of a step "
          f"({len(steps)} logged steps)")


if __name__ == "__main__":
  main()
