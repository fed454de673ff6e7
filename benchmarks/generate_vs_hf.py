"""Generation, ours against Hugging Face transformers `generate`, same weights and prompt (CPU, float32, greedy).

    REF=$(../shared/tools/reference-env.sh) && $REF benchmarks/generate_vs_hf.py [--new 64] [--rounds 3]

The model is train_vs_hf.py's ~52M-parameter dense config; the prompt is one 224x224 image (49 tokens) and text,
batch 1. Each side runs generate with 1 new token (prefill + one step) and with N new tokens; prefill time is the
first, decode tokens/s is (N - 1) / (t_N - t_1). Rounds alternate HF and ours after a warm-up (compilation is not
timed); medians are reported. The greedy outputs are compared token for token.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_vs_hf  # noqa: E402  (the shared model config and image sample)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--prompt", type=int, default=160, help="prompt length in tokens (image included)")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()

  import jax
  import torch
  from transformers import AutoConfig, AutoModelForImageTextToText

  from qwen3vl import hf
  from qwen3vl.infer.generate import generate
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.manual_seed(0)
  d = train_vs_hf.hf_config("dense")
  hf_model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(d.pop("model_type"), **d)).float().eval()
  sample, = train_vs_hf.make_samples(1, args.prompt)
  with tempfile.TemporaryDirectory() as tmp:
    hf_model.save_pretrained(tmp)
    ours = hf.load_pretrained(tmp, attention_impl="xla")
  ids = sample.input_ids[None]
  t_ids = torch.tensor(ids.astype(np.int64))
  hf_in = {"input_ids": t_ids, "attention_mask": torch.ones_like(t_ids),
           "mm_token_type_ids": (t_ids == train_vs_hf.IMAGE).long(),
           "pixel_values": torch.tensor(sample.image_pixels), "image_grid_thw": torch.tensor(sample.image_grid_thw)}

  def run_hf(n):
    with torch.no_grad():
      out = hf_model.generate(**hf_in, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].numpy()

  def run_ours(n):
    return generate(ours, ids, pixel_values=sample.image_pixels, image_grid_thw=sample.image_grid_thw,
                    max_new_tokens=n)[0]

  for n in (1, args.new):  # warm-up: compiles ours for both lengths
    run_ours(n)
    run_hf(n)
  same = np.array_equal(run_hf(args.new), run_ours(args.new))
  times = {(side, n): [] for side in ("hf", "ours") for n in (1, args.new)}
  for r in range(args.rounds):
    for n in (1, args.new):
      for side, fn in (("hf", run_hf), ("ours", run_ours)):
        t0 = time.perf_counter()
        fn(n)
        times[side, n].append(time.perf_counter() - t0)
    print(f"round {r}: " + ", ".join(f"{s} n={n}: {t[-1]:.3f} s" for (s, n), t in times.items()), flush=True)
  med = {k: float(np.median(v)) for k, v in times.items()}
  rate = {s: (args.new - 1) / max(med[s, args.new] - med[s, 1], 1e-9) for s in ("hf", "ours")}
  n_params = sum(p.numel() for p in hf_model.parameters())
  print(f"\n{n_params / 1e6:.1f}M parameters, prompt {ids.shape[1]} tokens (49 image), {args.new} new tokens, "
        f"greedy outputs identical: {same}; jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  print(f"| | HF transformers | ours | ours / HF |\n|---|---|---|---|\n"
        f"| prefill + 1 token (s) | {med['hf', 1]:.3f} | {med['ours', 1]:.3f} | {med['hf', 1] / med['ours', 1]:.2f}x faster |\n"
        f"| decode tokens / s | {rate['hf']:.1f} | {rate['ours']:.1f} | {rate['ours'] / rate['hf']:.2f}x |")


if __name__ == "__main__":
  main()
