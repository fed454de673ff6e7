"""Mixture-of-Depths (`mod_every`, `mod_capacity`): the gathered training path equals the same layer run on the
whole row with the unchosen tokens masked out (values and gradients, odd length, packed segments, padding);
decoding with the KV cache (skipped tokens hidden per layer) gives the tokens of the causal full-sequence forward;
skipped tokens cost no FLOPs in the compiled train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3vl.configs import models
from qwen3vl.config import ModelConfig
from qwen3vl.infer import generate
from qwen3vl.model import depth
from qwen3vl.model.inputs import prepare_inputs
from qwen3vl.model.stack import index_stack
from qwen3vl.model.vlm import init_model

NEW = 8


def _config(**kw):
  d = models.get_config("tiny_moe").to_dict()
  d["text"]["num_hidden_layers"] = 4
  return ModelConfig.from_dict(d).replace(attention_impl="xla", moe_impl="dense", **kw)


@pytest.fixture(scope="module")
def model():
  m = init_model(_config(mod_every=2), seed=1)
  out = m.depth_routers.predictor_out
  out.kernel[...] = out.kernel[...] * 30.0  # predictor logits far from 0: some tokens taken, some skipped
  return m


def _masked_reference(layer, router, h, cos, sin, seg, chosen):
  """The layer on the whole row; unchosen tokens are no keys and keep their state."""
  out, _, _ = layer(h, cos, sin, (seg, jnp.where(chosen, seg, -1)))
  w = jax.nn.sigmoid(router.score(h))[..., None]
  return jnp.where(chosen[..., None], h + w * (out - h), h)


def test_gathered_layer_equals_masked_layer(model):
  b, l = 2, 13  # odd length: k = ceil(0.5 * 13) = 7
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(b, l, 128)), jnp.float32)
  seg = jnp.asarray([[1] * 6 + [2] * 7, [1] * 9 + [0] * 4])  # two packed samples; padding at the end
  positions = jnp.broadcast_to(jnp.asarray([list(range(6)) + list(range(7)), list(range(13))])[None], (3, b, l))
  cos, sin = model._rope(positions, jnp.float32)
  layer, router = index_stack(model.layers, 1), index_stack(model.depth_routers, 0)

  def gathered(h, router):
    return depth.route_topk(layer, router, h, cos, sin, seg, 0.5)[0]

  def masked(h, router):
    chosen = depth.topk_choice(router.score(h), seg > 0, 0.5)[1]
    return _masked_reference(layer, router, h, cos, sin, seg, jax.lax.stop_gradient(chosen))

  _, chosen = depth.topk_choice(router.score(h), seg > 0, 0.5)
  assert int(chosen[0].sum()) == 7 and int(chosen[1].sum()) == 7 and not bool(chosen[1, 9:].any())
  np.testing.assert_allclose(nnx.jit(gathered)(h, router), nnx.jit(masked)(h, router), atol=1e-5)
  probe = jnp.asarray(rng.normal(size=h.shape), jnp.float32)
  grad = lambda f: nnx.jit(nnx.grad(lambda h, r: (f(h, r) * probe).sum(), argnums=(0, 1)))(h, router)
  (gh, gr), (mh, mr) = grad(gathered), grad(masked)
  np.testing.assert_allclose(gh, mh, atol=1e-5)
  np.testing.assert_allclose(gr.router.kernel[...], mr.router.kernel[...], atol=1e-4)
  assert float(jnp.abs(gr.router.kernel[...]).max()) > 0  # the router learns through its weight


def test_decoding_matches_the_causal_forward(model):
  prompt = np.random.default_rng(0).integers(0, 250, (1, 17)).astype(np.int32)
  tokens, state = generate(model, prompt, max_new_tokens=NEW, return_state=True)
  layers = model.config.text.num_hidden_layers
  assert layers // 2 * (NEW - 1) < int(state.layers[0]) < layers * (NEW - 1)  # the routed layers skipped some
  inputs, _ = prepare_inputs(model.config, np.concatenate([prompt, tokens], axis=1))
  logits, extras = model.forward(inputs, mod_routing="predictor")
  at = prompt.shape[1] - 1 + np.arange(NEW)
  np.testing.assert_array_equal(tokens[0], np.asarray(logits.argmax(-1))[0, at])
  processed = float(extras["depth"]["processed"])
  assert 0.0 < processed < 1.0


def test_skipped_tokens_cost_no_flops():
  ids = np.random.default_rng(0).integers(0, 250, (4, 64)).astype(np.int32)

  def flops(cfg):
    m = init_model(cfg)
    inputs, _ = prepare_inputs(cfg, ids)
    graphdef, params = nnx.split(m)

    def loss(params):
      logits, extras = nnx.merge(graphdef, params).forward(inputs, mod_routing="topk")
      return logits.mean() + (extras["depth"]["predictor_loss"] if "depth" in extras else 0.0)

    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

  base, mod = flops(_config(scan_layers=False)), flops(_config(scan_layers=False, mod_every=2))
  # Half the layers at half the tokens: the decoder's FLOPs fall by a quarter (the LM head and norms stay).
  assert 0.65 < mod / base < 0.85, (mod, base)


def test_mod_config_is_validated():
  with pytest.raises(ValueError, match="mod_every"):
    _config(mod_every=3).validate()
  with pytest.raises(ValueError, match="mod_capacity"):
    _config(mod_every=2, mod_capacity=0.0).validate()
