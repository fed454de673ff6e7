"""Adaptive-depth and efficiency switches on a trained model, against the same model without them (CPU).

    python train.py --config=configs/moe.py --config.model.text.num_hidden_layers=4 --workdir=runs/l4
    python benchmarks/adaptive.py --checkpoint=runs/l4 --exit_layers=1,2 --thresholds=1.0,0.99,0.9
    python benchmarks/adaptive.py --measure=mod --layers=4 --mod_every=2 --capacity=0.5
    python benchmarks/adaptive.py --measure=merge --checkpoint=runs/merged --ratios=1.0,0.5

Early exit (`exit_layers`, `exit_threshold`): the held-out synthetic questions answered greedily one at a time
(batch 1: a decode step whose token exits skips the remaining layers' compute), for each threshold: exact match,
answers equal to the full-depth answers, decoder layers run per decoded answer token, and on a fixed-length
continuation (`--new` tokens without stopping: the answer, then whatever the model says after it) the layers per
token and decode tokens/s (prefill excluded, median over the questions).

Mixture-of-Depths (`--measure=mod`): the real train step (`trainer.train_step`: forward, backward, AdamW) of the
default tiny MoE with and without MoD on the same first batch of the built-in data: FLOPs from the compiled cost
analysis (layers unrolled, so the count is exact) and step time, timed interleaved (A, B, A, B, ...) after a
warm-up, median ratio. Accuracy comes from training both with train.py (see RESULTS.md), as for cross-layer
sharing.

Vision-token merging (`--measure=merge`): for each ratio, the held-out questions answered greedily (exact match,
image tokens per question), and the prefill of one question about a larger image (`--pixels`, resized by the
checkpoint's processor otherwise capped at the tiny 64x64): prompt tokens, image tokens and the median time of
the compiled prefill (vision tower, merging, decoder; host preparation excluded) over interleaved rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--measure", default="early_exit", choices=("early_exit", "mod", "merge"))
  parser.add_argument("--ratios", default="1.0,0.5")
  parser.add_argument("--pixels", type=int, default=448 * 448)
  parser.add_argument("--image_size", type=int, default=None, help="synthetic image side (default: the run's)")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--mod_every", type=int, default=2)
  parser.add_argument("--capacity", type=float, default=0.5)
  parser.add_argument("--moe_impl", default=None, help="--measure=mod: experts as blocked / dense / ragged "
                      "(default: the hardware overlay's)")
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--checkpoint", default="workdir")
  parser.add_argument("--questions", type=int, default=128)
  parser.add_argument("--exit_layers", default="1,2")
  parser.add_argument("--thresholds", default="1.0,0.99,0.9")
  parser.add_argument("--new", type=int, default=32, help="tokens decoded for the speed measurement")
  args = parser.parse_args()
  if args.measure == "mod":
    return measure_mod(args)
  if args.measure == "merge":
    return measure_merge(args)

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


def measure_mod(args):
  import jax
  from flax import nnx
  from qwen3vl.configs.moe import get_config
  from qwen3vl import hardware
  from qwen3vl.data.tokenizer import Tokenizer
  from qwen3vl.model.vlm import Qwen3VL
  from qwen3vl.train import trainer
  from qwen3vl.train.optim import make_optimizer

  def variant(mod_every):
    config = get_config()
    config.model.text.num_hidden_layers = args.layers
    config.model.mod_every, config.model.mod_capacity = mod_every, args.capacity
    config.model.scan_layers = False  # unrolled: the cost analysis counts every layer
    config.model.moe_impl = args.moe_impl  # None: the hardware overlay's
    hardware.apply_overlay(config)
    tokenizer = Tokenizer.builtin()
    cfg = trainer.model_config(config, tokenizer)
    graphdef, state = nnx.split(Qwen3VL(cfg, rngs=nnx.Rngs(config.seed)))
    params = nnx.to_pure_dict(state)
    tx = make_optimizer(config.optim, config.train.steps, params)
    train_state = {"params": params, "opt_state": tx.init(params), "step": jax.numpy.zeros((), "int32"),
                   "rng": jax.random.key_data(jax.random.key(0))}
    loader, _ = trainer.make_loaders(config, tokenizer, cfg)
    batch = next(loader)
    loader.close()
    step = jax.jit(lambda s, b: trainer.train_step(s, b, graphdef=graphdef, tx=tx, config=config))
    compiled = step.lower(train_state, batch).compile()
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    return compiled, train_state, batch, flops

  runs = {"full depth": variant(0), f"MoD every {args.mod_every}, capacity {args.capacity:g}": variant(args.mod_every)}
  times = {name: [] for name in runs}
  for r in range(args.rounds + 3):
    for name, (compiled, state, batch, _) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(state, batch))
      if r >= 3:  # warm-up rounds
        times[name].append(time.perf_counter() - t0)
  (base, base_run), (mod, mod_run) = runs.items()
  print(f"train step, tiny MoE with {args.layers} decoder layers, batch of the built-in data, {args.rounds} "
        "interleaved rounds")
  print("| variant | FLOPs / step | ratio | median step time | ratio |")
  print("|---|---|---|---|---|")
  for name, run in runs.items():
    print(f"| {name} | {run[3]:.3g} | {run[3] / base_run[3]:.3f} | {np.median(times[name]) * 1e3:.1f} ms | "
          f"{np.median(times[name]) / np.median(times[base]):.3f} |")


def measure_merge(args):
  import dataclasses

  import jax
  from PIL import Image
  from qwen3vl.data.synthetic import make_record
  from qwen3vl.infer import generate
  from flax import nnx
  from qwen3vl.infer.assistant import Assistant, user_turn
  from qwen3vl.model.inputs import prepare_inputs
  from qwen3vl.model.vlm import with_runtime

  assistant = Assistant(args.checkpoint)
  full, small = assistant.model, assistant.image_processor
  large = dataclasses.replace(small, max_pixels=args.pixels, min_pixels=args.pixels // 2)
  run_config, size = os.path.join(args.checkpoint, "config.json"), args.image_size
  if size is None and os.path.exists(run_config):  # the image side the run trained on
    with open(run_config) as f:
      size = json.load(f).get("data", {}).get("image_size")
  records = [make_record("eval", i, **({"image_size": size} if size else {})) for i in range(args.questions)]
  truth = [r["meta"]["answer"] for r in records]
  question = records[0]["conversations"][0]["value"][len("<image>\n"):]
  side = int(args.pixels ** 0.5)
  big_image = records[0]["images"][0].resize((side, side), Image.BICUBIC)
  image_id = full.config.image_token_id
  stop = list(assistant.stop_ids)
  rows, runs = [], {}
  for ratio in [float(r) for r in args.ratios.split(",")]:
    assistant.model = with_runtime(full, vision_token_ratio=ratio)
    assistant.image_processor = small
    prompts = [assistant.inputs([user_turn(r["conversations"][0]["value"][len("<image>\n"):], 1)], r["images"])
               for r in records]
    answers = []
    for p in prompts:
      tokens = generate(assistant.model, **p, max_new_tokens=8, stop_ids=stop, pad_id=assistant.pad_id)
      answers.append(assistant.tokenizer.decode([int(t) for t in tokens[0] if t not in stop]).strip())
    em = np.mean([a == b for a, b in zip(answers, truth)])
    image_tokens = np.mean([int((p["input_ids"] == image_id).sum()) for p in prompts])
    assistant.image_processor = large
    big = assistant.inputs([user_turn(question, 1)], [big_image])
    inputs, _ = prepare_inputs(assistant.model.config, **big)
    runs[ratio] = (assistant.model, inputs)
    rows.append((ratio, em, image_tokens, big["input_ids"].shape[1], int((big["input_ids"] == image_id).sum())))
  prefill = nnx.jit(lambda m, i: m.prefill(i, m.new_cache(1, i.input_ids.shape[1]))[0])
  embed = nnx.jit(lambda m, i: m.embed_inputs(i)[0])  # the vision tower, merging and the scatter
  times = {ratio: [] for ratio in runs}
  embed_times = {ratio: [] for ratio in runs}
  for r in range(args.rounds + 2):
    for ratio, (model, inputs) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(prefill(model, inputs))
      t1 = time.perf_counter()
      jax.block_until_ready(embed(model, inputs))
      if r >= 2:
        times[ratio].append(t1 - t0)
        embed_times[ratio].append(time.perf_counter() - t1)
  base = np.median(times[rows[0][0]])
  base_decoder = base - np.median(embed_times[rows[0][0]])
  print(f"{args.checkpoint}: {len(records)} held-out questions; prefill of a {side}x{side} image, {args.rounds} "
        "interleaved rounds")
  print("| ratio | exact match | image tokens / question | large-image prompt tokens (image) | prefill | ratio | "
        "of which vision tower + merge | decoder part | ratio |")
  print("|---|---|---|---|---|---|---|---|---|")
  for ratio, em, tokens, length, image in rows:
    t, e = np.median(times[ratio]), np.median(embed_times[ratio])
    print(f"| {ratio:g} | {em:.3f} | {tokens:.1f} | {length} ({image}) | {t * 1e3:.1f} ms | {t / base:.3f} | "
          f"{e * 1e3:.1f} ms | {(t - e) * 1e3:.1f} ms | {(t - e) / base_decoder:.3f} |")


if __name__ == "__main__":
  main()
