"""PEFT and merged export (qwen3vl/peft.py, qwen3vl/tools/export.py): our adapted model equals HF + PEFT with the same
adapters (committed fixtures, tests/fixtures/make_peft_fixtures.py), the export reproduces the committed adapter
files, a merged export reloads with the adapted logits, and a LoRA work directory exports both ways."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import FIXTURES
from qwen3vl import hf, peft
from qwen3vl.model.vlm import Qwen3VL
from qwen3vl.train import adapters
from tests.fixtures import make_peft_fixtures as mk

TOL = 1e-4  # max abs logit error vs HF + PEFT at float32
PEFT_DIR = os.path.join(FIXTURES, "peft")


@pytest.fixture(scope="module")
def inputs():
  return dict(np.load(os.path.join(FIXTURES, "models", "inputs.npz")))


@pytest.fixture(scope="module")
def adapted():
  """Per kind: (config with adapters, base parameters, the fixture's seeded adapters)."""
  cache = {}

  def get(kind):
    if kind not in cache:
      cfg = mk.model_config(kind)
      cache[kind] = cfg, hf.read_params(os.path.join(FIXTURES, "models", kind), cfg), mk.adapters(cfg)
    return cache[kind]
  return get


def _model(cfg, params):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, adapters.conform(params, nnx.to_pure_dict(state))))
  return nnx.merge(graphdef, state)


def _max_errors(model, inp, ref):
  logits = model(inp["input_ids"], pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"],
                 pixel_values_videos=inp["pixel_values_videos"], video_grid_thw=inp["video_grid_thw"],
                 attention_mask=inp["attention_mask"])
  text = model(inp["text_input_ids"], attention_mask=inp["text_attention_mask"])
  return (np.abs(np.asarray(logits) - ref["logits"])[inp["attention_mask"].astype(bool)].max(),
          np.abs(np.asarray(text) - ref["text_logits"])[inp["text_attention_mask"].astype(bool)].max())


@pytest.mark.parametrize("kind", mk.KINDS)
def test_adapted_logits_match_peft(kind, inputs, adapted):
  cfg, base, lora = adapted(kind)
  ref = np.load(os.path.join(PEFT_DIR, f"logits_{kind}.npz"))
  err, err_text = _max_errors(_model(cfg, adapters.join(base, lora)), inputs, ref)
  print(f"{kind}: max |logit - PEFT| {err:.3g}, text-only {err_text:.3g}")
  assert err <= TOL and err_text <= TOL, (err, err_text)


@pytest.mark.parametrize("kind", mk.KINDS)
def test_export_equals_committed_adapters(kind, adapted, tmp_path):
  cfg, _, lora = adapted(kind)
  peft.save_adapters(lora, cfg, str(tmp_path), base_model_name_or_path=mk.base_name(kind))
  want_dir = os.path.join(PEFT_DIR, kind)
  assert json.load(open(tmp_path / peft.CONFIG_FILE)) == json.load(open(os.path.join(want_dir, peft.CONFIG_FILE)))
  got, want = load_file(tmp_path / peft.WEIGHTS_FILE), load_file(os.path.join(want_dir, peft.WEIGHTS_FILE))
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_merged_export_reloads_with_adapted_logits(inputs, adapted, tmp_path):
  cfg, base, lora = adapted("dense")
  plain = cfg.replace(lora_rank=0, lora_targets=())
  hf.save_pretrained(_model(plain, adapters.merge(adapters.join(base, lora), cfg)), str(tmp_path))
  err, err_text = _max_errors(hf.load_pretrained(str(tmp_path)), inputs,
                              np.load(os.path.join(PEFT_DIR, "logits_dense.npz")))
  assert err <= TOL and err_text <= TOL, (err, err_text)


def test_expert_adapters_follow_peft_layout():
  """PEFT's parameter adapters: lora_A [E r, in] expert-major rows, lora_B [out, r E] with column k E + e."""
  cfg = mk.model_config("moe")
  e, r = cfg.text.num_experts, cfg.lora_rank
  lora = mk.adapters(cfg)
  a, b = lora["layers"]["mlp"]["down_lora"]["a"][1], lora["layers"]["mlp"]["down_lora"]["b"][1]  # layer 1
  tensors, _, parameters = peft.adapter_tensors(lora, cfg)
  assert "model.language_model.layers.1.mlp.experts.down_proj" in parameters
  module = "base_model.model.model.language_model.layers.1.mlp.experts."
  lora_a, lora_b = tensors[module + "lora_A.weight"], tensors[module + "lora_B.weight"]
  for expert in range(e):
    np.testing.assert_array_equal(lora_a.reshape(e, r, -1)[expert], a[expert].T)
    np.testing.assert_array_equal(lora_b.reshape(-1, r, e)[:, :, expert], b[expert].T)
  assert module + "base_layer.lora_A.weight" in tensors  # gate_up_proj: the inner of PEFT's two wrappers


# ------------------------------------------------------------------------------------------ the command
def test_lora_workdir_exports_both_ways(tmp_path):
  from qwen3vl.config import ModelConfig
  from qwen3vl.configs import dense, models
  from qwen3vl.tools import export
  from qwen3vl.train import init_from, trainer
  base_dir, workdir = str(tmp_path / "base"), str(tmp_path / "run")
  # the tiny preset (the built-in tokenizer's ids), as a HF directory
  hf.save_pretrained(Qwen3VL(ModelConfig.from_dict(models.get_config("tiny").to_dict()), rngs=nnx.Rngs(0)),
                     base_dir)
  c = dense.get_config()
  c.data.batch_size, c.data.max_length, c.data.max_patches, c.data.synthetic_eval_size = 2, 64, 64, 2
  c.optim.warmup_steps = 1
  c.train.update({"steps": 2, "log_every": 1, "eval_every": 1000, "eval_batches": 1, "checkpoint_every": 1000})
  c.init_from, c.lora.rank, c.lora.alpha, c.lora.base, c.lora.targets = base_dir, 4, 8.0, "float32", \
      "attention,vision_qkv,merger"
  trainer.train(c, workdir)
  export.main([f"--checkpoint={workdir}", f"--peft={tmp_path / 'peft'}", f"--merged={tmp_path / 'merged'}"])

  # merged: a HF directory with the run's tokenizer and the run's weights, adapters folded in
  assert os.path.isfile(tmp_path / "merged" / "tokenizer.json")
  reloaded = nnx.to_pure_dict(nnx.state(hf.load_pretrained(str(tmp_path / "merged")), nnx.Param))
  _, want, _ = init_from.workdir_params(workdir)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), reloaded, adapters.conform(want, reloaded))

  # PEFT: base + s * B A per adapted module gives the merged weights (HF layout, as PEFT merges)
  config = json.load(open(tmp_path / "peft" / peft.CONFIG_FILE))
  assert (config["peft_type"], config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
      "LORA", 4, 8, base_dir)
  ada = load_file(tmp_path / "peft" / peft.WEIGHTS_FILE)
  base, merged = load_file(os.path.join(base_dir, "model.safetensors")), load_file(tmp_path / "merged" /
                                                                                   "model.safetensors")
  assert len(config["target_modules"]) == 3 * 4 + 2 + 2 * 2  # 3 layers' q, k, v, o; 2 blocks' qkv; 2 mergers' fc1, fc2
  changed = 0
  for module in config["target_modules"]:
    a, b = (ada[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
    w = module + ".weight"
    np.testing.assert_allclose(merged[w], base[w] + 2.0 * b @ a, atol=1e-6, err_msg=module)
    changed += bool(np.any(b))
  assert changed == len(config["target_modules"]), "the run did not train every adapter's B"
  untouched = [n for n in base if n.removesuffix(".weight") not in config["target_modules"]]
  assert all(np.array_equal(merged[n], base[n]) for n in untouched)


def test_export_errors_name_the_input(tmp_path, capsys):
  from qwen3vl.config import ModelConfig
  from qwen3vl.configs import models
  from qwen3vl.tools import export
  with pytest.raises(SystemExit):
    export.main([f"--checkpoint={FIXTURES}/models/dense", f"--peft={tmp_path / 'out'}"])
  assert "not a train.py work directory" in capsys.readouterr().err
  full = tmp_path / "full_run"  # a full fine-tuning run: no adapters
  full.mkdir()
  (full / "model_config.json").write_text(json.dumps(ModelConfig.from_dict(models.get_config("tiny").to_dict())
                                                     .to_dict()))
  with pytest.raises(SystemExit):
    export.main([f"--checkpoint={full}", f"--peft={tmp_path / 'out'}"])
  err = capsys.readouterr().err
  assert str(full) in err and "no adapters" in err and "--merged" in err
