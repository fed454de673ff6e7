"""Metrics: a progress bar on the console, one JSON object per line in WORKDIR/metrics.jsonl, TensorBoard when
installed (tensorboardX or tf.summary are not required)."""
from __future__ import annotations

import json
import os
import time

from tqdm import tqdm


class MetricsWriter:

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, *, enabled: bool = True):
    """enabled=False (the other processes of a multi-host run): no file, no bar, text still printed."""
    self.file = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
    self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True, disable=not enabled)
    self.tb = None
    if not enabled:
      return
    try:  # optional
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      pass

  def write(self, step: int, metrics: dict):
    record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
    if self.file is None:
      return
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k not in ("step", "time"):
          self.tb.add_scalar(k, v, step)
    shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in record.items()
             if k in ("train/loss", "train/accuracy", "train/tokens_per_s", "eval/exact_match", "rl/reward",
                      "dpo/loss")}
    if shown:
      self.bar.set_postfix(shown, refresh=False)

  def advance(self, n: int = 1):
    self.bar.update(n)

  def print(self, text: str):
    self.bar.write(text)

  def close(self):
    self.bar.close()
    if self.file is not None:
      self.file.close()
    if self.tb is not None:
      self.tb.close()


def _plain(v):
  try:
    return v.item() if hasattr(v, "item") else (v.tolist() if hasattr(v, "tolist") else v)
  except (TypeError, ValueError):
    return v.tolist()
