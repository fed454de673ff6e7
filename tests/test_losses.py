"""Training losses against hand computations."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from qwen3vl.train import losses


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (2, 5))
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  targets[0, :2] = logits[0, :2].argmax(-1)  # some right, the rest mostly wrong
  loss, correct = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -(np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum() / mask.sum()
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_array_equal(correct, logits.argmax(-1) == targets)


def test_chunked_cross_entropy_equals_full():
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
  head = jnp.asarray(rng.standard_normal((8, 37)), jnp.float32)  # vocab not a multiple of the chunk
  targets = jnp.asarray(rng.integers(0, 37, (2, 6)))
  mask = jnp.asarray(rng.random((2, 6)) > 0.2, jnp.float32)
  targets = targets.at[0, :3].set((hidden @ head)[0, :3].argmax(-1))
  full, _ = losses.cross_entropy(hidden @ head, targets, mask)
  chunked, correct = losses.chunked_cross_entropy(hidden, head, targets, mask, chunk=10)
  np.testing.assert_allclose(chunked, full, rtol=1e-5)
  np.testing.assert_array_equal(correct, (hidden @ head).argmax(-1) == targets)
  assert correct.sum() >= 3
  g_full = jax.grad(lambda h: losses.cross_entropy(h @ head, targets, mask)[0])(hidden)
  g_chunk = jax.grad(lambda h: losses.chunked_cross_entropy(h, head, targets, mask, 10)[0])(hidden)
  np.testing.assert_allclose(g_chunk, g_full, atol=1e-6)


def test_moe_losses_against_hand_computation():
  rng = np.random.default_rng(2)
  layers, tokens, experts, k = 2, 5, 4, 2
  logits = rng.standard_normal((layers, tokens, experts)).astype(np.float32)
  mask = np.array([1, 1, 0, 1, 1], np.float32)
  aux, z, load = losses.moe_losses(jnp.asarray(logits), jnp.asarray(mask), k)
  counts, prob_sum, rows, z_sum = np.zeros(experts), np.zeros(experts), 0, 0.0
  for l, t in itertools.product(range(layers), range(tokens)):
    if not mask[t]:
      continue
    p = np.exp(logits[l, t]) / np.exp(logits[l, t]).sum()
    for e in np.argsort(-p)[:k]:
      counts[e] += 1
    prob_sum += p
    rows += 1
    z_sum += np.log(np.exp(logits[l, t]).sum()) ** 2
  f, p_mean = counts / rows, prob_sum / rows
  np.testing.assert_allclose(aux, experts * np.sum(f * p_mean), rtol=1e-5)
  np.testing.assert_allclose(z, z_sum / rows, rtol=1e-5)
  np.testing.assert_allclose(load, f, rtol=1e-6)
  assert abs(float(load.sum()) - k) < 1e-5


def test_exact_match_counts_whole_samples():
  targets = jnp.array([[1, 2, 3, 4, 5, 6]])
  predicted = jnp.array([[1, 2, 9, 4, 5, 6]])
  mask = jnp.array([[0, 1, 1, 0, 1, 1]], jnp.float32)
  segments = jnp.array([[1, 1, 1, 2, 2, 2]])  # sample 1 has a wrong masked token, sample 2 is right
  right, total = losses.exact_match(predicted == targets, mask, segments)
  assert (int(right), int(total)) == (1, 2)
