"""Model parity with HF transformers (golden fixtures; live when torch is importable) and model invariants."""
import dataclasses
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURES
from qwen3vl import hf
from qwen3vl.config import ModelConfig
from qwen3vl.model.inputs import prepare_inputs

MODELS = os.path.join(FIXTURES, "models")
TOL = 1e-4  # max abs logit error vs HF at float32
HAVE_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


@pytest.fixture(scope="module")
def inputs():
  return dict(np.load(os.path.join(MODELS, "inputs.npz")))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  """Fixture checkpoints by kind; "moe_v5" is the MoE checkpoint with experts in the transformers-5 layout
  (what transformers 5 writes; the committed "moe" has the released layout)."""
  from tests.fixtures.make_model_fixtures import swap_expert_layout
  cache = {}

  def get(kind, **runtime):
    key = (kind, tuple(sorted(runtime.items())))
    if key not in cache:
      path = os.path.join(MODELS, kind)
      if kind == "moe_v5":
        path = str(tmp_path_factory.mktemp("moe_v5"))
        swap_expert_layout(os.path.join(MODELS, "moe"), path)
      cache[key] = hf.load_pretrained(path, **runtime)
    return cache[key]
  return get


def _prepare(model, inp):
  return prepare_inputs(model.config, inp["input_ids"], pixel_values=inp["pixel_values"],
                        image_grid_thw=inp["image_grid_thw"], pixel_values_videos=inp["pixel_values_videos"],
                        video_grid_thw=inp["video_grid_thw"], attention_mask=inp["attention_mask"])[0]


@nnx.jit
def _forward(model, x):
  return model.forward(x)


def _check_against(model, inp, ref):
  x = _prepare(model, inp)
  merged, deepstack = nnx.jit(lambda m, p, g: m.visual(p, g))(model, x.pixel_values, x.vision)
  np.testing.assert_allclose(merged, ref["vision_merged"], atol=TOL, rtol=0)
  np.testing.assert_allclose(deepstack, ref["vision_deepstack"], atol=TOL, rtol=0)
  logits, extras = _forward(model, x)
  mask = inp["attention_mask"].astype(bool)
  err = np.abs(np.asarray(logits) - ref["logits"])[mask].max()
  assert err <= TOL, f"max abs logit error {err:.3g} > {TOL}"
  if "router_logits" in ref:
    got = np.asarray(extras["router_logits"])[:, mask.reshape(-1)]
    np.testing.assert_allclose(got, ref["router_logits"][:, mask.reshape(-1)], atol=TOL, rtol=0)
  text = model(inp["text_input_ids"], attention_mask=inp["text_attention_mask"])
  tmask = inp["text_attention_mask"].astype(bool)
  err_text = np.abs(np.asarray(text) - ref["text_logits"])[tmask].max()
  assert err_text <= TOL, f"text-only max abs logit error {err_text:.3g}"
  return err


@pytest.mark.parametrize("kind", ["dense", "tied", "moe", "moe_v5"])
def test_logits_match_hf_fixture(kind, inputs, loaded):
  ref = dict(np.load(os.path.join(MODELS, f"outputs_{kind.replace('_v5', '')}.npz")))
  _check_against(loaded(kind), inputs, ref)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch/transformers not installed (fixtures cover CI)")
@pytest.mark.parametrize("kind,seed", [("dense", 11), ("tied", 12), ("moe", 13), ("dense", 14), ("moe", 15)])
def test_logits_match_hf_live_on_unseen_configs(kind, seed, inputs, tmp_path):
  from tests.fixtures import make_model_fixtures as mk
  model = mk.build_hf_model(kind, seed=seed, config=mk.random_hf_config(kind, seed))
  model.save_pretrained(tmp_path)
  _check_against(hf.load_pretrained(str(tmp_path)), inputs, mk.hf_outputs(model, inputs))


def test_scanned_equals_unscanned(inputs, loaded):
  x = _prepare(loaded("moe"), inputs)
  scanned, _ = _forward(loaded("moe"), x)
  unscanned, _ = _forward(loaded("moe", scan_layers=False), x)
  np.testing.assert_allclose(scanned, unscanned, atol=1e-6, rtol=0)


def test_ragged_and_blocked_moe_equal_dense_moe():
  from qwen3vl.configs import models
  from qwen3vl.model.moe import MoE
  cfg = ModelConfig.from_dict(models.get_config("tiny_moe").to_dict())
  h = jax.random.normal(jax.random.key(0), (2, 37, cfg.text.hidden_size))  # 74 rows x top-2: uneven groups

  @nnx.jit
  def value_and_grad(mlp, h):
    return nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(h)[0])))(mlp), mlp(h)[0]
  (_, g_d), y_d = value_and_grad(MoE(cfg.replace(moe_impl="dense"), nnx.Rngs(0)), h)
  for impl in ("ragged", "blocked"):  # the grouped paths are what training runs and differentiates
    (_, g), y = value_and_grad(MoE(cfg.replace(moe_impl=impl), nnx.Rngs(0)), h)  # the same weights
    np.testing.assert_allclose(y, y_d, atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_d)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [1, 8])
@pytest.mark.parametrize("ids", [
    [[4, 1], [1, 4], [4, 4], [1, 1], [4, 1], [9, -1], [1, 4]] * 3,  # two groups of several blocks; other devices' ids
    [[0, 5]] * 21,  # a group that fills every block but one
    [[j % 6, (j + 1) % 6] for j in range(21)],  # groups of 7, empty 6th group
])
def test_expert_layout_and_blocked_experts_equal_a_per_copy_reference(ids, block):
  """Token copies through the expert layout and the experts' MLP (block 1: ragged_dot on the sorted layout; 8:
  the blocked scan) against the per-copy swiglu(x[t] @ gate_up[e]) @ down[e], values and gradients, with ids of
  other devices' experts (no row), empty experts and partly filled blocks."""
  from qwen3vl.model.experts import blocked_experts, expert_layout, from_layout, swiglu, to_layout
  ids = jnp.asarray(ids, jnp.int32)
  x = jax.random.normal(jax.random.key(1), (ids.shape[0], 24))
  gate_up = jax.random.normal(jax.random.key(2), (6, 24, 20)) / 4
  down = jax.random.normal(jax.random.key(3), (6, 10, 24)) / 3
  w = jax.random.normal(jax.random.key(4), (*ids.shape, 24))
  mine = (ids >= 0) & (ids < 6)
  layout = expert_layout(ids, 6, block)
  assert int(layout.group_sizes.sum()) == int(mine.sum())

  def ours(x, gate_up, down):
    rows = to_layout(x, layout)
    if block == 1:
      y = jax.lax.ragged_dot(swiglu(jax.lax.ragged_dot(rows, gate_up, layout.group_sizes)), down, layout.group_sizes)
    else:
      y = blocked_experts(rows, gate_up, down, layout, block)
    return jnp.sum(jnp.sin(from_layout(y, layout)) * w)

  def reference(x, gate_up, down):
    e = jnp.clip(ids, 0, 5)
    y = jnp.einsum("tki,tkih->tkh", swiglu(jnp.einsum("tc,tkci->tki", x, gate_up[e])), down[e])
    return jnp.sum(jnp.where(mine[..., None], jnp.sin(y), 0) * w)
  for a, b in zip(jax.value_and_grad(ours, (0, 1, 2))(x, gate_up, down),
                  jax.value_and_grad(reference, (0, 1, 2))(x, gate_up, down)):
    for a, b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_deepstack_changes_the_output(inputs, loaded):
  model = loaded("dense")
  x = _prepare(model, inputs)
  base, _ = _forward(model, x)
  graphdef, state = nnx.split(model)
  ablated = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
  for merger in ablated.visual.deepstack_mergers:
    merger.fc2.kernel[...] = jnp.zeros_like(merger.fc2.kernel[...])
    merger.fc2.bias[...] = jnp.zeros_like(merger.fc2.bias[...])
  changed, _ = _forward(ablated, x)
  mask = inputs["attention_mask"].astype(bool)
  assert np.abs(np.asarray(changed) - np.asarray(base))[mask].max() > 1e-3


def test_save_load_round_trip_is_bit_exact(loaded, tmp_path):
  for kind in ("moe_v5", "tied"):
    model = loaded(kind)
    out = tmp_path / kind
    hf.save_pretrained(model, str(out), max_shard_bytes=300_000)  # force several shards + an index
    assert (out / "model.safetensors.index.json").exists()
    again = hf.load_pretrained(str(out))
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Written in the released layout: gate_up [E, H, 2I], down [E, I, H].
  from safetensors import safe_open
  t = loaded("moe_v5").config.text
  index = json.load(open(tmp_path / "moe_v5" / "model.safetensors.index.json"))["weight_map"]
  name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
  with safe_open(str(tmp_path / "moe_v5" / index[name]), "numpy") as f:
    assert f.get_slice(name).get_shape() == [t.num_experts, t.hidden_size, 2 * t.moe_intermediate_size]


def test_bfloat16_load_runs_close_to_float32(inputs, loaded):
  model = loaded("dense", dtype="bfloat16")
  assert model.embed.embedding[...].dtype == jnp.bfloat16
  x = _prepare(model, inputs)
  logits, _ = _forward(model, x)
  ref = dict(np.load(os.path.join(MODELS, "outputs_dense.npz")))["logits"]
  mask = inputs["attention_mask"].astype(bool)
  assert logits.dtype == jnp.float32
  assert np.abs(np.asarray(logits) - ref)[mask].max() < 0.1 * np.abs(ref).max()


# ----------------------------------------------------------------------------------------------- errors
def test_image_token_count_mismatch_is_a_clear_error(inputs, loaded):
  ids = inputs["input_ids"].copy()
  ids[0, np.argmax(ids[0] == 300)] = 5  # drop one image token
  with pytest.raises(ValueError, match="image tokens and image features do not match"):
    loaded("dense")(ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                    pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"],
                    attention_mask=inputs["attention_mask"])


def test_missing_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  shutil.copytree(os.path.join(MODELS, "dense"), tmp_path / "m")
  tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
  del tensors["model.language_model.layers.2.self_attn.k_norm.weight"]
  save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
  with pytest.raises(ValueError, match=r"missing 1 tensor.*layers\.2\.self_attn\.k_norm\.weight"):
    hf.load_pretrained(str(tmp_path / "m"))


def test_misshaped_and_unexpected_tensors_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  shutil.copytree(os.path.join(MODELS, "dense"), tmp_path / "m")
  tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
  tensors["model.language_model.norm.weight"] = np.ones(7, np.float32)
  save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
  with pytest.raises(ValueError, match=r"language_model\.norm\.weight.*shape"):
    hf.load_pretrained(str(tmp_path / "m"))
  tensors["model.language_model.norm.weight"] = np.ones(64, np.float32)
  tensors["model.extra.weight"] = np.ones(3, np.float32)
  save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
  with pytest.raises(ValueError, match=r"unexpected tensor.*model\.extra\.weight"):
    hf.load_pretrained(str(tmp_path / "m"))


def test_unsupported_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
  with pytest.raises(ValueError, match="unsupported model_type 'llava'"):
    hf.load_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------------------------- config
def test_config_reads_both_hf_layouts():
  v5 = json.load(open(os.path.join(MODELS, "moe", "config.json")))  # transformers-5: rope_parameters
  cfg = ModelConfig.from_hf(v5)
  old = cfg.to_hf()  # 4.57 layout: rope_theta + rope_scaling in text_config
  assert "rope_scaling" in old["text_config"] and "rope_parameters" not in old["text_config"]
  assert ModelConfig.from_hf(old) == cfg
  assert cfg.text.num_experts == 6 and cfg.text.head_dim == 24 and cfg.text.mrope_section == (6, 3, 3)
  assert ModelConfig.from_hf(json.load(open(os.path.join(MODELS, "tied", "config.json")))).tie_word_embeddings


def test_config_validation_names_the_field():
  cfg = ModelConfig()
  with pytest.raises(ValueError, match="text.mrope_section"):
    dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, mrope_section=(8, 8, 8))).validate()
  with pytest.raises(ValueError, match=r"unknown text config field\(s\) \['hiden_size'\]"):
    ModelConfig.from_dict({"text": {"hiden_size": 3}})


def test_block_sparse_vision_attention_equals_segment_attention(inputs, loaded):
  """vision_block_size > 0 routes the tower through kernels.block_sparse_attention over the per-image layout."""
  dense, sparse = loaded("dense", vision_block_size=0), loaded("dense", vision_block_size=32)
  x = _prepare(dense, inputs)
  run = nnx.jit(lambda m, p, g: m.visual(p, g))
  for a, b in zip(run(dense, x.pixel_values, x.vision), run(sparse, x.pixel_values, x.vision)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
