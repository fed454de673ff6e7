"""Writes a small real-image JSONL set: scikit-learn's scanned handwritten digits as PNGs with chat turns.

    pip install scikit-learn   # only this tool needs it
    python -m qwen3vl.tools.make_digits_jsonl --out data/digits
    python train.py --config=configs/moe.py --config.data.train_path=data/digits/train.jsonl \\
        --config.data.eval_path=data/digits/eval.jsonl --workdir=runs/digits

Why this set: it ships inside scikit-learn (no download at run time), the images are real scans (the UCI
optical-recognition digits, 8x8, 17 grey levels, 1797 of them), and every answer is checkable, so a run on it
shows the JSONL path learning from pixels it was not designed around. Images are upscaled to 64x64 (nearest) and
saved as PNG; the questions vary in wording; a few broken records (a missing file, a corrupt PNG, an oversized
prompt) are mixed into the training file so the skip counters are exercised too.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import PIL.Image

QUESTIONS = ("Which digit is this?", "What number is written here?", "Read the handwritten digit.",
             "What digit does the image show?")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="data/digits", help="output directory")
  parser.add_argument("--eval_fraction", type=float, default=0.2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  try:
    from sklearn.datasets import load_digits
  except ImportError:
    raise SystemExit("make_digits_jsonl needs scikit-learn: pip install scikit-learn") from None

  digits = load_digits()
  rng = np.random.default_rng(args.seed)
  order = rng.permutation(len(digits.images))
  n_eval = int(len(order) * args.eval_fraction)
  os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
  splits = {"eval": order[:n_eval], "train": order[n_eval:]}
  for split, indices in splits.items():
    records = []
    for i in indices:
      name = f"images/{i:04d}.png"
      pixels = (255 - digits.images[i] * 255 / 16).astype(np.uint8)  # dark ink on white, like paper
      PIL.Image.fromarray(pixels).resize((64, 64), PIL.Image.NEAREST).convert("RGB").save(
          os.path.join(args.out, name))
      question = QUESTIONS[rng.integers(len(QUESTIONS))]
      records.append({"image": name, "conversations": [{"from": "human", "value": "<image>\n" + question},
                                                       {"from": "gpt", "value": str(digits.target[i])}]})
    if split == "train":
      with open(os.path.join(args.out, "images", "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
      broken = [{"image": "images/missing.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                  {"from": "gpt", "value": "0"}]},
                {"image": "images/corrupt.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                  {"from": "gpt", "value": "0"}]},
                {"image": "images/0000.png", "conversations": [{"from": "human", "value": "<image>\n" + "why " * 500},
                                                               {"from": "gpt", "value": "0"}]}]
      for k, record in enumerate(broken):
        records.insert(len(records) * (k + 1) // 4, record)
    with open(os.path.join(args.out, f"{split}.jsonl"), "w") as f:
      for record in records:
        f.write(json.dumps(record) + "\n")
    print(f"{split}: {len(records)} records -> {os.path.join(args.out, split + '.jsonl')}")


if __name__ == "__main__":
  main()
