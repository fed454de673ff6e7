"""Cross-layer parameter sharing (`ModelConfig.share_every`): half the decoder parameters at share_every=2, the
same logits, greedy tokens and gradients as the unshared model whose layer pairs hold the same weights (the one
`save_pretrained` writes), and config errors that name the field."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3vl.configs import models
from qwen3vl import hf
from qwen3vl.config import ModelConfig
from qwen3vl.infer import generate
from qwen3vl.model.inputs import prepare_inputs
from qwen3vl.model.vlm import Qwen3VL, count_params


def _config(**kw):
  d = models.get_config("tiny_moe").to_dict()
  d["text"]["num_hidden_layers"] = 4
  return ModelConfig.from_dict(d).replace(attention_impl="xla", **kw)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  shared = Qwen3VL(_config(share_every=2), rngs=nnx.Rngs(0))
  path = str(tmp_path_factory.mktemp("expanded"))
  hf.save_pretrained(shared, path)  # written per layer: the equivalent unshared model
  return shared, hf.load_pretrained(path, attention_impl="xla")


def test_sharing_halves_the_decoder_parameters():
  assert count_params(_config(share_every=2))["layers"] * 2 == count_params(_config())["layers"]
  assert count_params(_config(share_every=4))["layers"] * 4 == count_params(_config())["layers"]


def test_shared_model_equals_its_unshared_expansion(pair):
  shared, full = pair
  assert full.config.share_every == 1
  ids = np.random.default_rng(0).integers(0, 250, (2, 24)).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(shared(ids)), np.asarray(full(ids)))
  np.testing.assert_array_equal(generate(shared, ids, max_new_tokens=8), generate(full, ids, max_new_tokens=8))


def test_shared_gradients_are_the_sum_over_the_layers_that_use_them(pair):
  shared, full = pair
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 250, (2, 16)), jnp.int32)
  inputs, _ = prepare_inputs(shared.config, ids)

  def grads(model):
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: nnx.merge(graphdef, p).forward(inputs)[0].std()
    return nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))["layers"]

  g_shared, g_full = grads(shared), grads(full)
  summed = jax.tree.map(lambda g: g.reshape((2, 2) + g.shape[1:]).sum(1), g_full)  # layers 2k and 2k+1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_shared, summed)


def test_share_every_must_divide_the_layers():
  with pytest.raises(ValueError, match="share_every"):
    _config(share_every=3).validate()
