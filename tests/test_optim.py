"""The optimizer: parameter groups by path (freeze / scale), no weight decay on norms and biases, accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwen3vl.configs import moe
from qwen3vl.train.optim import make_optimizer, param_group

PARAMS = {
    "visual": {"blocks": {"attn": {"kernel": jnp.ones((2, 3))}}, "merger": {"fc1": {"kernel": jnp.ones((3,)),
                                                                               "bias": jnp.ones((3,))}},
               "deepstack_mergers": {"0": {"norm": {"scale": jnp.ones((3,))}}}},
    "layers": {"mlp": {"kernel": jnp.ones((4,))}, "input_norm": {"scale": jnp.ones((4,))}},
}


def _optim(**lr_mult):
  c = moe.get_config().optim
  c.warmup_steps, c.weight_decay, c.clip_norm = 0, 0.5, 1e9
  c.lr_mult.update(lr_mult)
  return c


def _step(optim, grads):
  tx = make_optimizer(optim, 100, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  return optax.apply_updates(PARAMS, updates)


def test_groups_by_path():
  groups = jax.tree_util.tree_map_with_path(lambda p, _: param_group(tuple(k.key for k in p)), PARAMS)
  assert groups["visual"]["blocks"]["attn"]["kernel"] == "vision"
  assert groups["visual"]["merger"]["fc1"]["kernel"] == groups["visual"]["deepstack_mergers"]["0"]["norm"][
      "scale"] == "merger"
  assert groups["layers"]["mlp"]["kernel"] == "llm"


def test_freezing_scaling_and_no_decay_on_norms_and_biases():
  zero = jax.tree.map(jnp.zeros_like, PARAMS)  # zero gradients: only weight decay moves a parameter
  new = _step(_optim(vision=0.0, merger=2.0), zero)
  np.testing.assert_array_equal(new["visual"]["blocks"]["attn"]["kernel"], 1.0)  # frozen, decay included
  np.testing.assert_array_equal(new["visual"]["merger"]["fc1"]["bias"], 1.0)  # no decay on biases
  np.testing.assert_array_equal(new["layers"]["input_norm"]["scale"], 1.0)  # nor on norm scales
  lr = _optim().lr
  decayed_llm = 1.0 - lr * 0.5
  np.testing.assert_allclose(new["layers"]["mlp"]["kernel"], decayed_llm, rtol=1e-6)
  np.testing.assert_allclose(new["visual"]["merger"]["fc1"]["kernel"], 1.0 - 2 * lr * 0.5, rtol=1e-6)  # x2 lr


def test_gradient_accumulation_applies_the_mean_every_k_steps():
  optim = _optim()
  optim.grad_accum = 2
  tx = make_optimizer(optim, 100, PARAMS)
  state = tx.init(PARAMS)
  g1 = jax.tree.map(lambda p: jnp.full_like(p, 1.0), PARAMS)
  g2 = jax.tree.map(lambda p: jnp.full_like(p, 3.0), PARAMS)
  u1, state = tx.update(g1, state, PARAMS)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(u1))  # nothing applied mid-accumulation
  u2, _ = tx.update(g2, state, PARAMS)
  plain = make_optimizer(_optim(), 100, PARAMS)
  expected, _ = plain.update(jax.tree.map(lambda p: jnp.full_like(p, 2.0), PARAMS), plain.init(PARAMS), PARAMS)
  for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
