"""Training end to end on the tiny configs: the loss falls, kill-and-resume logs identical losses, config errors
name the field. One short run per behaviour (each compiles the train step once)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from qwen3vl.configs import dense, moe
from qwen3vl.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(base=moe, **train):
  c = base.get_config()
  c.data.batch_size, c.data.max_length, c.data.max_patches = 4, 96, 128
  c.data.synthetic_eval_size = 8
  c.optim.warmup_steps = 2
  c.train.update({"log_every": 1, "eval_every": 1000, "eval_batches": 1, "checkpoint_every": 1000, **train})
  return c


def _losses(workdir, missing_ok=False):
  path = os.path.join(workdir, "metrics.jsonl")
  if missing_ok and not os.path.exists(path):
    return {}
  with open(path) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def _command(workdir, steps):
  c = _config(steps=steps)
  flags = [f"--config.data.{k}={c.data[k]}" for k in ("batch_size", "max_length", "max_patches",
                                                      "synthetic_eval_size")]
  flags += [f"--config.train.{k}={c.train[k]}" for k in ("steps", "log_every", "eval_every", "eval_batches",
                                                         "checkpoint_every")]
  return [sys.executable, "train.py", "--config=configs/moe.py", f"--workdir={workdir}",
          f"--config.optim.warmup_steps={c.optim.warmup_steps}"] + flags


def test_kill_and_resume_gives_identical_losses(tmp_path):
  resumed = tmp_path / "resumed"
  proc = subprocess.Popen(_command(resumed, 12), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

  def kill_after_step_3():
    deadline = time.time() + 300
    while time.time() < deadline and max(_losses(resumed, missing_ok=True), default=0) < 3:
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # killed mid-run: it saves a checkpoint at the step it reached
  killer = threading.Thread(target=kill_after_step_3)
  killer.start()
  straight = tmp_path / "straight"  # trained here meanwhile
  trainer.train(_config(steps=12), str(straight))
  killer.join()
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err.decode()[-2000:]
  killed_at = max(_losses(resumed))
  assert killed_at < 12, "the run finished before it was killed; the test proves nothing"
  subprocess.run(_command(resumed, 12), cwd=ROOT, check=True, capture_output=True, timeout=600)
  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 13))
  for step in range(1, 13):
    assert b[step] == pytest.approx(a[step], rel=1e-6), (step, killed_at, a[step], b[step])
  assert a[12] < a[1]  # and it learns


def test_dense_config_trains_and_evaluates(tmp_path):
  c = _config(dense, steps=3, eval_every=3)
  result = trainer.train(c, str(tmp_path))
  assert set(result) >= {"eval/loss", "eval/accuracy", "eval/exact_match"}
  assert result["eval/samples"] > 0
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["train"]["steps"] == 3 and saved["model"]["dtype"] == "float32"


@pytest.mark.parametrize("field,value,match", [
    ("train.steps", 0, "train.steps"),
    ("data.max_patches", 6, "data.max_patches"),
    ("model.image_token_id", 5, "image_token_id=5 but the tokenizer has 262"),
])
def test_config_errors_name_the_field(tmp_path, field, value, match):
  c = _config(steps=2)
  node, leaf = c, field.split(".")
  for k in leaf[:-1]:
    node = node[k]
  node[leaf[-1]] = value
  with pytest.raises(ValueError, match=match):
    trainer.train(c, str(tmp_path))


def test_command_line_overrides_are_validated():
  out = subprocess.run([sys.executable, "train.py", "--config=configs/moe.py", "--config.optim.lrr=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "lrr" in out.stderr
