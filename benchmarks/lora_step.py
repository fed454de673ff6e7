"""Train-step time of LoRA / QLoRA against full fine-tuning, side by side in one process (interleaved rounds, so
a noisy machine slows all of them alike), with each variant's trainable parameters and held bytes.

    python benchmarks/lora_step.py --init_from=workdir [--config=configs/moe.py] [--rank=8] [--rounds=7]

Every variant runs train.py's own step (`trainer.TrainStep`) on the same batches of the config's data.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qwen3vl import distributed, hardware  # noqa: E402
from qwen3vl.data.tokenizer import Tokenizer  # noqa: E402
from qwen3vl.train import adapters, init_from, trainer  # noqa: E402
from qwen3vl.train.optim import make_optimizer  # noqa: E402


def build(config):
  """(step fn, train state, frozen params, batches) of `config` as train.py builds them."""
  hardware.apply_overlay(config)
  start = trainer.source(config)
  tokenizer_file = config.tokenizer or init_from.tokenizer_file(start)
  tokenizer = Tokenizer.from_file(tokenizer_file) if tokenizer_file else Tokenizer.builtin()
  cfg = trainer.model_config(config, tokenizer)
  graphdef, params, frozen, mesh = trainer.initial_params(config, cfg, start)
  tx = make_optimizer(config.optim, config.train.steps, params)
  shardings = trainer.state_shardings(params, tx, mesh, config)
  state = trainer.initial_state(params, tx, shardings, config.seed)
  loader, _ = trainer.make_loaders(config, tokenizer, cfg)
  batches = [distributed.global_batch(next(loader), mesh, cfg.vision.spatial_merge_size) for _ in range(4)]
  return trainer.TrainStep(graphdef, tx, config, shardings, mesh), state, frozen, batches


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/moe.py", help="FILE[:preset] of configs/")
  parser.add_argument("--init_from", required=True, help="a HF or train.py work directory (the base)")
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
  args = parser.parse_args()
  file, _, preset = args.config.partition(":")
  configs = importlib.import_module(f"qwen3vl.configs.{os.path.basename(file).removesuffix('.py')}")
  variants = {"full": {}, f"lora r{args.rank}": dict(rank=args.rank, base="bfloat16"),
              f"qlora r{args.rank} nf4": dict(rank=args.rank, base="nf4")}
  built = {}
  for name, lora in variants.items():
    config = configs.get_config(*([preset] if preset else []))
    config.init_from = args.init_from
    config.lora.update(lora)
    built[name] = build(config)
  times = {name: [] for name in built}
  for r in range(args.rounds + 1):  # round 0 compiles
    for name, (step, state, frozen, batches) in built.items():
      begin = time.perf_counter()
      for i in range(args.steps):
        state, _ = step(state, batches[i % len(batches)], frozen)
      jax.block_until_ready(state)
      built[name] = (step, state, frozen, batches)
      if r:
        times[name].append((time.perf_counter() - begin) / args.steps)
  full = statistics.median(times["full"])
  print(f"{'variant':<18}{'trainable':>12}{'frozen':>12}{'step ms':>10}{'vs full':>9}")
  for name, (_, state, frozen, _) in built.items():
    ms = statistics.median(times[name])
    print(f"{name:<18}{adapters.count(state['params']):>12,}{adapters.count(frozen):>12,}{ms * 1e3:10.1f}"
          f"{ms / full:8.2f}x")


if __name__ == "__main__":
  main()
