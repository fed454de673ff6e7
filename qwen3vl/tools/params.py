"""Print a model preset's parameter count (from abstract shapes: nothing is allocated).

    python -m qwen3vl.tools.params 30b_a3b
    python -m qwen3vl.tools.params --all
"""
from __future__ import annotations

import argparse

from qwen3vl.configs import models
from qwen3vl.config import ModelConfig
from qwen3vl.model.vlm import count_params


def active_params(cfg: ModelConfig, counts: dict[str, int]) -> int:
  """Parameters touched per token: MoE layers use top-k of E experts."""
  t = cfg.text
  if not t.is_moe:
    return counts["total"]
  expert = t.num_hidden_layers * t.num_experts * 3 * t.hidden_size * t.moe_intermediate_size
  return counts["total"] - expert + expert * t.num_experts_per_tok // t.num_experts


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("preset", nargs="?", default="tiny", help=f"one of {sorted(models.PRESETS)}")
  parser.add_argument("--all", action="store_true", help="every preset")
  args = parser.parse_args(argv)
  names = sorted(models.PRESETS) if args.all else [args.preset]
  print(f"{'preset':<11} {'total':>15} {'active':>15} {'vision':>13} {'decoder':>15} {'embed+head':>13}")
  for name in names:
    cfg = ModelConfig.from_dict(models.get_config(name).to_dict())
    c = count_params(cfg)
    embed = c.get("embed", 0) + c.get("lm_head", 0)
    print(f"{name:<11} {c['total']:>15,} {active_params(cfg, c):>15,} {c['visual']:>13,} {c['layers']:>15,} "
          f"{embed:>13,}")


if __name__ == "__main__":
  main()
