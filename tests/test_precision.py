"""Precision policies (`ModelConfig.precision`): the empty policy is the model as it was (bit for bit); bfloat16
and float8 parts stay close to float32 in values and gradients; the float8 matmul (per-tensor scales, float32
accumulation) against the float32 one on odd shapes; bad policies name the field."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3vl.configs import models
from qwen3vl.config import ModelConfig
from qwen3vl.model.inputs import prepare_inputs
from qwen3vl.model.layers import _matmul_2d
from qwen3vl.model.vlm import init_model, with_runtime


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig.from_dict(models.get_config("tiny_moe").to_dict()).replace(attention_impl="xla")
  return init_model(cfg, seed=1)


def _cosine(a, b):
  a, b = np.ravel(a), np.ravel(b)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_float8_matmul_against_float32_on_odd_shapes():
  x = jax.random.normal(jax.random.key(0), (3, 37, 53))
  w = jax.random.normal(jax.random.key(1), (53, 29)) * 0.1
  exact, f8 = _matmul_2d(x, w), _matmul_2d(x, w, fp8=True)
  assert f8.shape == exact.shape and f8.dtype == exact.dtype
  assert float(jnp.abs(f8 - exact).max() / jnp.abs(exact).max()) < 0.08  # e4m3: 3 mantissa bits
  g_exact = jax.grad(lambda x, w: jnp.sin(_matmul_2d(x, w)).sum(), argnums=(0, 1))(x, w)
  g_f8 = jax.grad(lambda x, w: jnp.sin(_matmul_2d(x, w, fp8=True)).sum(), argnums=(0, 1))(x, w)
  for a, b in zip(g_exact, g_f8):
    assert _cosine(a, b) > 0.99


def test_policies_stay_close_to_float32(model):
  ids = np.random.default_rng(0).integers(0, 250, (2, 24)).astype(np.int32)
  inputs, _ = prepare_inputs(model.config, ids)

  def loss_and_grads(m):  # a loss that reads every logit of one vocabulary column, and its gradients
    graphdef, params = nnx.split(m, nnx.Param)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p).forward(inputs)[0])[..., 7])
    loss, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(loss), np.concatenate([np.ravel(a) for a in jax.tree.leaves(grads)])

  reference = loss_and_grads(model)
  same = loss_and_grads(with_runtime(model, precision=""))  # the default policy: nothing changes
  assert same[0] == reference[0] and np.array_equal(same[1], reference[1])
  for policy, tolerance, min_cosine in (("vision=bfloat16,decoder=bfloat16,head=float32", 0.01, 0.999),
                                        ("decoder=float8,head=float8", 0.05, 0.98)):
    loss, grads = loss_and_grads(with_runtime(model, precision=policy))
    assert abs(loss - reference[0]) <= tolerance * abs(reference[0]), (policy, loss, reference[0])
    assert _cosine(grads, reference[1]) >= min_cosine, (policy, _cosine(grads, reference[1]))


def test_bad_policies_name_the_field(model):
  for bad in ("decoder=float4", "encoder=bfloat16"):
    with pytest.raises(ValueError, match="precision"):
      with_runtime(model, precision=bad)
