"""LoRA and QLoRA: adapters start as the identity, merge into the plain model exactly, only adapters train and
are checkpointed, a LoRA run resumes exactly and is served by infer.py, a quantized base stays within its bound."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURES
from qwen3vl.config import ModelConfig
from qwen3vl.model import lora, quant
from qwen3vl.model.inputs import prepare_inputs
from qwen3vl.model.vlm import Qwen3VL
from qwen3vl.train import adapters, init_from

MODELS = os.path.join(FIXTURES, "models")
ALL = ",".join(lora.TARGETS)


@pytest.fixture(scope="module")
def inputs():
  return dict(np.load(os.path.join(MODELS, "inputs.npz")))


def _logits(cfg, params, inp):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, adapters.conform(jax.tree.map(jnp.asarray, params), nnx.to_pure_dict(state)))
  model = nnx.merge(graphdef, state)
  x = prepare_inputs(cfg, inp["input_ids"], pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"],
                     pixel_values_videos=inp["pixel_values_videos"], video_grid_thw=inp["video_grid_thw"],
                     attention_mask=inp["attention_mask"])[0]
  return np.asarray(nnx.jit(lambda m, x: m.forward(x)[0])(model, x))


def _lora_cfg(kind, rank=4, targets=ALL, **kw):
  plain = init_from.architecture(os.path.join(MODELS, kind))
  return plain, plain.replace(lora_rank=rank, lora_alpha=8.0, lora_targets=lora.parse_targets(targets), **kw)


def _randomize_b(params, seed=1, size=0.05):
  rng = np.random.default_rng(seed)

  def walk(tree):
    return {k: ({"a": v["a"], "b": rng.normal(0, size, np.shape(v["b"])).astype(np.float32)}
                if str(k).endswith(lora.SUFFIX) else walk(v) if isinstance(v, dict) else v) for k, v in tree.items()}
  return walk(params)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_adapters_start_as_identity_and_merge_exactly(kind, inputs):
  plain, cfg = _lora_cfg(kind)
  base = init_from.base_params(os.path.join(MODELS, kind), cfg)
  params = adapters.build(init_from.abstract_params(cfg), base, cfg, seed=0)
  trainable, frozen = adapters.split(params, cfg)
  assert trainable and all(lora.is_adapter(p) for p in _paths(trainable))
  assert not any(lora.is_adapter(p) for p in _paths(frozen))
  # every target is adapted: vision blocks, mergers, attention, and the MLP (dense) or experts (MoE)
  names = {".".join(map(str, p)) for p in _paths(trainable)}
  for part in ("visual.blocks.qkv", "visual.merger.fc1", "attn.q_proj", "attn.o_proj",
               "mlp.down_proj" if kind == "dense" else "mlp.down_lora"):
    assert any(part in n for n in names), (part, sorted(names)[:8])

  reference = _logits(plain, base, inputs)
  np.testing.assert_allclose(_logits(cfg, params, inputs), reference, atol=1e-5)  # B = 0: the base model

  adapted = _randomize_b(params)
  out = _logits(cfg, adapted, inputs)
  assert np.abs(out - reference).max() > 1e-2  # the adapters do something
  merged = adapters.merge(adapted, cfg)
  np.testing.assert_allclose(_logits(plain, merged, inputs), out, atol=2e-4)


def _paths(tree):
  return [tuple(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("kind,bound", [("int8", 1 / 254), ("nf4", float(np.diff(quant.NF4).max()) / 2)])
def test_quantized_weights_stay_within_half_a_level(kind, bound):
  w = np.random.default_rng(0).standard_normal((3, 128, 40)).astype(np.float32)
  codes, scale = quant.quantize(w, kind)
  assert codes.dtype == quant.code_dtype(kind) and codes.shape == w.shape
  assert scale.shape == quant.scale_shape(kind, w.shape) == ((3, 1, 40) if kind == "int8" else (3, 2, 40))
  back = np.asarray(quant.dequantize(jnp.asarray(codes), jnp.asarray(scale), jnp.float32))
  step = np.repeat(scale, w.shape[1] // scale.shape[1], axis=1)  # each element's block scale
  err = np.abs(back - w) / step
  assert err.max() <= bound + 1e-6, err.max()  # the largest gap between levels, halved
  assert err.mean() < bound / 2
  np.testing.assert_array_equal(quant.quantize(back, kind)[0], codes)  # levels are fixed points


def test_quantized_base_runs_close_to_the_float_base(inputs):
  plain, _ = _lora_cfg("dense")
  base = init_from.base_params(os.path.join(MODELS, "dense"), plain)
  reference = _logits(plain, base, inputs)
  for kind, tol in (("int8", 0.05), ("nf4", 0.5)):
    _, cfg = _lora_cfg("dense", base_quant=kind)
    out = _logits(cfg, adapters.build(init_from.abstract_params(cfg), base, cfg), inputs)
    err = np.abs(out - reference).max()
    assert 0 < err < tol * np.abs(reference).max(), (kind, err)


def test_only_adapters_get_gradients_and_dropout_is_keyed(inputs):
  plain, cfg = _lora_cfg("moe", targets="llm", lora_dropout=0.5)
  params = _randomize_b(adapters.build(init_from.abstract_params(cfg), init_from.base_params(
      os.path.join(MODELS, "moe"), cfg), cfg))
  trainable, frozen = adapters.split(params, cfg)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))
  like = nnx.to_pure_dict(state)
  ids = inputs["input_ids"][:1, :12]
  x = prepare_inputs(cfg, np.where(ids >= 300, 7, ids))[0]  # text only (image tokens replaced)

  def loss(p, key):
    with lora.dropout_key(key):
      model = nnx.merge(graphdef, adapters.conform(jax.tree.map(jnp.asarray, adapters.join(p, frozen)), like))
      return jnp.mean(model.forward(x)[0] ** 2)
  grads = jax.grad(loss)(trainable, None)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  norms = {".".join(p): float(jnp.linalg.norm(g)) for p, g in zip(_paths(grads), jax.tree.leaves(grads))}
  assert all(v > 0 for v in norms.values()), [k for k, v in norms.items() if v == 0]
  key = jax.random.key(0)
  assert float(loss(trainable, key)) == float(loss(trainable, key))  # the same key, the same masks
  assert float(loss(trainable, key)) != float(loss(trainable, jax.random.key(1)))
  assert float(loss(trainable, None)) != float(loss(trainable, key))  # no key: dropout off


def test_targets_and_config_errors_name_the_input():
  assert lora.parse_targets("attention,mlp_down") == ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_down")
  with pytest.raises(ValueError, match="'qproj' is unknown"):
    lora.parse_targets("qproj")
  plain, _ = _lora_cfg("dense")
  with pytest.raises(ValueError, match="lora_dropout"):
    plain.replace(lora_rank=2, lora_targets=("q_proj",), lora_dropout=1.0).validate()
  with pytest.raises(ValueError, match="base_quant"):
    plain.replace(base_quant="int4").validate()


# ------------------------------------------------------------------------------------------- train.py runs
def _train_config(init, steps, **lora_fields):
  from qwen3vl.configs import moe
  c = moe.get_config()
  c.data.batch_size, c.data.max_length, c.data.max_patches = 4, 96, 128
  c.data.synthetic_eval_size = 8
  c.optim.warmup_steps = 2
  c.train.update(log_every=1, eval_every=1000, eval_batches=1, checkpoint_every=2, steps=steps)
  c.init_from = init
  c.lora.update(lora_fields)
  return c


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  """A tiny MoE train.py work directory (3 steps from scratch): what a LoRA run starts from."""
  from qwen3vl.train import trainer
  path = str(tmp_path_factory.mktemp("base"))
  trainer.train(_train_config(None, 3), path)
  return path


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def test_lora_run_checkpoints_adapters_resumes_exactly_and_is_served(base_workdir, tmp_path):
  from qwen3vl.infer.assistant import Assistant
  from qwen3vl.train import trainer
  from qwen3vl.train.checkpoint import Checkpointer
  fields = dict(rank=4, base="nf4", targets="llm,merger", dropout=0.1)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  trainer.train(_train_config(base_workdir, 4, **fields), straight)
  trainer.train(_train_config(base_workdir, 2, **fields), resumed)
  trainer.train(_train_config(base_workdir, 4, **fields), resumed)  # continues from step 2
  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for step in a:
    assert b[step] == pytest.approx(a[step], rel=1e-6), (step, a, b)

  ckpt = Checkpointer(straight, keep=10, async_save=False)
  saved, base = ckpt.restore_params(4), ckpt.restore_base(4)
  ckpt.close()
  assert base == {"init_from": os.path.abspath(base_workdir)}
  assert _paths(saved) and all(lora.is_adapter(p) for p in _paths(saved))  # no frozen weight written

  # infer.py's loader folds the adapters into the dequantized base: equal to the LoRA model itself
  cfg = ModelConfig.from_dict(json.load(open(os.path.join(straight, "model_config.json"))))
  plain, merged, _ = init_from.workdir_params(straight)
  assert plain.lora_rank == 0 and plain.base_quant == ""
  full = adapters.build(init_from.abstract_params(cfg), init_from.base_params(base_workdir, cfg), cfg)
  params = adapters.join(adapters.split(full, cfg)[1], adapters.conform(
      saved, adapters.split(init_from.abstract_params(cfg), cfg)[0]))
  ids = np.array([[5, 6, 7, 8, 9, 10]], np.int32)
  inp = {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": None, "image_grid_thw": None,
         "pixel_values_videos": None, "video_grid_thw": None}
  np.testing.assert_allclose(_logits(plain, merged, inp), _logits(cfg, params, inp), atol=1e-4)
  reply = Assistant(straight).chat().say("How many squares are there?", max_new_tokens=3)
  assert reply.prompt_tokens > 0 and len(reply.token_ids) <= 3
