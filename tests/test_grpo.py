"""Post-training (qwen3vl/train/posttrain.py, grpo.py, dpo.py, rollout.py): GRPO's training rows are exactly what
`generate` chose, a killed and resumed GRPO run logs the uninterrupted run's rewards and losses, and DPO trains on
a pairs file. The objectives' numbers: tests/test_policy_losses.py."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from conftest import ROOT

FLAGS = ["--config=configs/grpo.py", "--config.rl.prompts=2", "--config.rl.group=4", "--config.rl.updates=2",
         "--config.rl.rewards=exact_match,format", "--config.train.log_every=1", "--config.train.eval_every=1000",
         "--config.train.checkpoint_every=2", "--config.data.synthetic_eval_size=8", "--config.train.eval_batches=1",
         "--config.optim.warmup_steps=1"]


def _tiny_config():
  from qwen3vl.config import ModelConfig
  from qwen3vl.configs import models
  return ModelConfig.from_dict(models.get_config("tiny_moe").to_dict()).replace(moe_impl="blocked",
                                                                                 attention_impl="xla")


def _builder(cfg, max_length):
  """The tiny config's sample builder: the synthetic 64-pixel images as 16 patches."""
  from qwen3vl.data.datasets import SampleBuilder, processors_for
  from qwen3vl.data.tokenizer import Tokenizer
  ip, vp = processors_for(cfg.vision, min_pixels=32 * 32, max_pixels=64 * 64)
  return SampleBuilder(Tokenizer.builtin(), max_length=max_length, image_processor=ip, video_processor=vp)


def test_training_rows_hold_the_sampled_answers():
  """Greedy rollouts of a fresh tiny model: in the rows built for the update, the model's argmax at every answer
  position is the token `generate` chose there (prompt, vision, positions and the answer all line up)."""
  from qwen3vl.data.packing import Packer, to_model_inputs
  from qwen3vl.data.synthetic import make_record
  from qwen3vl.model.vlm import Qwen3VL
  from qwen3vl.train import rewards, rollout

  cfg = _tiny_config()
  model = Qwen3VL(cfg, rngs=nnx.Rngs(3))
  builder = _builder(cfg, 64)
  ids = builder.tokenizer.special_ids
  records = [make_record("eval", i) for i in range(3)]
  out = rollout.sample(model, builder, records, [builder.prompt(r) for r in records],
                       rewards.select("exact_match,format"), group=2, max_new_tokens=6,
                       temperature=0.0, top_p=None, rng=jax.random.key(0), stop_ids=[ids["im_end"]],
                       pad_id=ids["pad"])
  assert len(out.answers) == 6 and out.rewards["format"].shape == (3, 2)
  assert out.answers[0] == out.answers[1]  # greedy: a group's answers agree
  packer = Packer(6, 64, 6 * 16, pack=False, builder=builder, merge_size=2,
                  num_position_embeddings=cfg.vision.num_position_embeddings)
  for sample in rollout.training_rows(builder, out):
    assert packer.add(sample)
  batch = packer.flush()
  logits, _ = model.forward(to_model_inputs(batch))
  picked = np.asarray(logits).argmax(-1)
  mask = batch["loss_mask"] > 0
  assert mask.sum() == sum(len(a) for a in out.answers)  # every answer token is a target (the first one from
  # the prompt's last position)
  np.testing.assert_array_equal(picked[mask], batch["targets"][mask])
  for row, answer in enumerate(out.answers):
    np.testing.assert_array_equal(batch["targets"][row][mask[row]], answer)


def _run(workdir, steps=4):
  return subprocess.Popen([sys.executable, "train.py", *FLAGS, f"--config.train.steps={steps}",
                           f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _records(workdir, missing_ok=False):
  path = os.path.join(workdir, "metrics.jsonl")
  if missing_ok and not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if "rl/reward" in line]


def test_killed_and_resumed_grpo_logs_the_same_rewards_and_losses(tmp_path):
  """A run killed (SIGTERM) after step 2 of 6 and started again logs what the uninterrupted run logs: the same
  answers sampled (rollout RNG and prompt position restored) and the same updates."""
  straight, killed = _run(tmp_path / "straight", 6), _run(tmp_path / "resumed", 6)
  deadline = time.time() + 600
  while time.time() < deadline and killed.poll() is None and len(_records(tmp_path / "resumed", True)) < 2:
    time.sleep(0.2)
  killed.send_signal(signal.SIGTERM)  # it saves a checkpoint at the step it reached
  for p in (straight, killed):
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, out[-3000:]
  killed_at = len(_records(tmp_path / "resumed"))
  assert killed_at < 6, "the run finished before it was killed; the test proves nothing"
  again = _run(tmp_path / "resumed", 6)
  out = again.communicate(timeout=900)[0]
  assert again.returncode == 0 and "resumed from step" in out, out[-3000:]
  a, b = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
  for key in ("rl/reward", "rl/reward_format", "rl/answer_tokens", "rl/objective", "train/grad_norm"):
    np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-6, err_msg=key)
  assert any(r["rl/reward_format"] > 0 for r in a) and any(r["train/grad_norm"] > 0 for r in a)


def test_dpo_on_a_pairs_file_rows_and_a_short_run(tmp_path):
  """DPO from a pairs JSONL: each pair is two rows holding the chosen and the rejected answer (then <|im_end|>);
  a short run starts at loss log 2 (policy = reference) and pushes every pair's margin positive."""
  from qwen3vl.configs import dpo as dpo_config
  from qwen3vl.data.synthetic import make_record
  from qwen3vl.train import posttrain, trainer
  from qwen3vl.train.dpo import DPO

  with open(tmp_path / "pairs.jsonl", "w") as f:
    for i in range(4):
      record = make_record("train", i)
      record["images"][0].save(tmp_path / f"{i}.png")
      question = record["conversations"][0]["value"].replace("<image>\n", "")
      f.write(json.dumps({"image": f"{i}.png", "prompt": question, "chosen": record["meta"]["answer"],
                          "rejected": "I cannot tell"}) + "\n")
    f.write(json.dumps({"image": "0.png", "prompt": "Why?", "chosen": "because " * 40, "rejected": "no"}) + "\n")
  config = dpo_config.get_config()
  config.rl.pairs, config.rl.prompts = str(tmp_path / "pairs.jsonl"), 2
  config.optim.lr, config.optim.warmup_steps = 1e-2, 1
  config.train.steps, config.train.log_every, config.train.eval_every = 4, 1, 1000
  config.data.synthetic_eval_size, config.train.eval_batches = 4, 1

  # The rows, without a model: chosen then rejected after the same prompt.
  builder = _builder(_tiny_config(), config.data.max_length)
  method = DPO(config, builder)
  source = method.source(None)
  records = [source[0]]
  prompt = builder.prompt(records[0])
  rows, per_row, _ = method.rows(None, records, [prompt], None)
  end = builder.tokenizer.special_ids["im_end"]
  for row, text in zip(rows, (records[0]["chosen"], "I cannot tell")):
    np.testing.assert_array_equal(row.input_ids[:prompt.length], prompt.input_ids)
    np.testing.assert_array_equal(row.targets[row.loss_mask > 0], builder.tokenizer.encode(text) + [end])
  np.testing.assert_array_equal(per_row["pair_weight"], [1, 1])

  assert trainer.train(config, str(tmp_path / "run"))["eval/samples"] > 0
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if "dpo/loss" in line]
  assert [r["step"] for r in logged] == [1, 2, 3, 4]
  np.testing.assert_allclose(logged[0]["dpo/loss"], np.log(2), rtol=1e-5)
  assert logged[-1]["dpo/loss"] < 0.5 and logged[-1]["dpo/reward_accuracy"] == 1.0
  # The pairs file serves the prompts; the pair whose chosen row is too long is passed over.
  taken = posttrain.Prompts(source, method.prompt, 0).take(8)[0]
  assert {r["chosen"] for r in taken} == {source[i]["chosen"] for i in range(4)}
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "4")
