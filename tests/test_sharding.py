"""Mesh sharding: the logical -> mesh table for the tiny MoE (golden file), mesh sizes, and the same training run
on 1 device and on 8 simulated CPU devices (fsdp 2 x expert 2 x tensor 2) giving the same losses."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from conftest import FIXTURES, ROOT
from configs import moe
from qwen3vl import hardware, sharding
from qwen3vl.data.tokenizer import Tokenizer
from qwen3vl.model.vlm import Qwen3VL
from qwen3vl.train import trainer

GOLDEN = os.path.join(FIXTURES, "sharding", "tiny_moe_fsdp2_expert2_tensor2.txt")


def _tiny_moe_specs(sizes):
  c = moe.get_config()
  hardware.apply_overlay(c)
  model = nnx.eval_shape(lambda: Qwen3VL(trainer.model_config(c, Tokenizer.builtin()), rngs=nnx.Rngs(0)))
  return sharding.param_specs(nnx.state(model, nnx.Param), AbstractMesh(sizes, sharding.AXES))


def test_golden_sharding_table():
  specs = _tiny_moe_specs((1, 2, 2, 2))
  with open(GOLDEN) as f:
    assert sharding.describe(specs) == f.read().splitlines()
  assert specs["layers"]["mlp"]["gate_up"] == P(None, "expert", "fsdp", "tensor")  # experts on their shard only
  data_parallel = jax.tree.leaves(_tiny_moe_specs((8, 1, 1, 1)), is_leaf=lambda x: isinstance(x, P))
  assert data_parallel and all(s == P() for s in data_parallel)  # pure data parallel: every weight whole


def test_specs_keep_what_an_axis_does_not_divide():
  mesh = AbstractMesh((1, 4, 1, 3), sharding.AXES)
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 9), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), (6, 8), mesh) == P()  # 4 does not divide 6, 3 not 8
  assert sharding.logical_to_spec(("batch", None), (8, 5), AbstractMesh((2, 2, 3, 1), sharding.AXES)) == \
      P(("data", "fsdp"))  # 12 does not divide 8: the longest dividing prefix of the batch axes


def test_mesh_sizes():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1, "expert": 2}, 8) == \
      {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
  with pytest.raises(ValueError, match="needs 4 devices, 8 are here"):
    sharding.mesh_shape({"data": 1, "fsdp": 2, "tensor": 2, "expert": 1}, 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)


def _train(workdir, devices, *mesh_flags):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  flags = ["--config.train.steps=6", "--config.train.log_every=1", "--config.train.eval_every=1000",
           "--config.train.checkpoint_every=1000", "--config.data.batch_size=4", "--config.data.max_length=64",
           "--config.data.max_patches=64", "--config.data.synthetic_eval_size=4", "--config.train.eval_batches=1"]
  run = subprocess.run([sys.executable, "train.py", "--config=configs/moe.py", f"--workdir={workdir}", *flags,
                        *mesh_flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["train/loss"] for line in f if "train/loss" in line]
  local, total = map(float, re.search(r"optimizer state: ([\d.]+) MiB per device of ([\d.]+) MiB", run.stdout).groups())
  return np.asarray(losses), local, total


def test_one_device_and_eight_give_the_same_losses(tmp_path):
  one, local1, total1 = _train(tmp_path / "one", 1)
  eight, local8, total8 = _train(tmp_path / "eight", 8, "--config.mesh.fsdp=2", "--config.mesh.expert=2",
                                 "--config.mesh.tensor=2")
  assert len(one) == len(eight) == 6
  np.testing.assert_allclose(eight, one, rtol=1e-3)
  assert local1 == total1 == total8
  assert local8 < total8 / 3  # most weights split 4 or 8 ways; only norms and the router stay at 2 or whole
