"""GRPO and DPO objectives (qwen3vl/train/policy_losses.py) against plain-numpy computations on hand-built groups."""
import jax
import jax.numpy as jnp
import numpy as np

from qwen3vl.train import policy_losses as pl

RNG = np.random.default_rng(0)
B, L = 6, 5  # 2 prompts x 3 answers, up to 5 answer tokens
MASK = (np.arange(L)[None, :] < np.array([5, 3, 1, 4, 2, 5])[:, None]).astype(np.float32)


def _numpy_grpo(logp, old, ref, adv, mask, eps, beta):
  ratio = np.exp(logp - old)
  per_token = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps, 1 + eps) * adv[:, None])
  per_token += beta * (np.exp(ref - logp) - (ref - logp) - 1)
  return (per_token * mask).sum() / mask.sum()


def test_group_advantages_are_the_rewards_normalised_within_each_group():
  rewards = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
  got = np.asarray(pl.group_advantages(jnp.asarray(rewards)))
  want = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-4)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0, 0] > 0 > got[0, 1] and np.all(got[1] == 0)  # a group that all scored alike teaches nothing
  centred = rewards - rewards.mean(1, keepdims=True)
  np.testing.assert_allclose(pl.group_advantages(jnp.asarray(rewards), "none"), centred, atol=1e-7)
  mean = np.asarray(pl.group_advantages(jnp.asarray(rewards), "mean"))
  np.testing.assert_allclose(mean, centred / (rewards.mean(1, keepdims=True) + 1e-4), rtol=1e-5)


def test_mean_scaled_advantages_give_the_gradient_of_log_success():
  """With advantages scaled by the group mean and a 0/1 reward, a group's expected update is
  (1 - (1 - p)^(G - 1)) x the gradient of log p(right answer), SFT's gradient for all but prompts too hard for the
  group: checked exactly by enumerating every group of 3 answers drawn from a 4-answer softmax."""
  import itertools
  logits, right, group = jnp.asarray(RNG.normal(0, 1, 4)), 2, 3

  def expected(logits):
    p = jax.nn.softmax(jax.lax.stop_gradient(logits))
    logp = jax.nn.log_softmax(logits)
    total = 0.0
    for answers in itertools.product(range(4), repeat=group):
      rewards = jnp.asarray([[float(a == right) for a in answers]])
      adv = jnp.nan_to_num(pl.group_advantages(rewards, "mean", eps=0.0)[0])  # no right answer: 0 / 0 -> 0
      total += jnp.prod(p[jnp.asarray(answers)]) * sum(adv[k] * logp[a] for k, a in enumerate(answers)) / group
    return total

  p = float(jax.nn.softmax(logits)[right])
  want = (1 - (1 - p) ** (group - 1)) * jax.grad(lambda x: jax.nn.log_softmax(x)[right])(logits)
  np.testing.assert_allclose(jax.grad(expected)(logits), want, rtol=1e-4, atol=1e-7)


def test_grpo_loss_equals_numpy_on_a_hand_built_group():
  logp = RNG.normal(-1.0, 0.3, (B, L))
  old = logp + RNG.normal(0, 0.3, (B, L))  # ratios both inside and outside the clip range
  ref = logp + RNG.normal(0, 0.2, (B, L))
  adv = np.asarray(pl.group_advantages(jnp.asarray([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]]))).reshape(-1)
  loss, metrics = pl.grpo_loss(*map(jnp.asarray, (logp, old, ref, adv, MASK)), clip_eps=0.2, kl_coef=0.1)
  np.testing.assert_allclose(loss, _numpy_grpo(logp, old, ref, adv, MASK, 0.2, 0.1), rtol=1e-5)
  ratio = np.exp(logp - old)
  clipped = ((adv[:, None] > 0) & (ratio > 1.2)) | ((adv[:, None] < 0) & (ratio < 0.8))
  np.testing.assert_allclose(metrics["clip_fraction"], (clipped * MASK).sum() / MASK.sum(), rtol=1e-6)
  assert 0 < metrics["clip_fraction"] < 1
  # the gradient, against numpy's by central differences (float64 numpy, the loss is smooth where not clipped)
  grad = np.asarray(jax.grad(lambda p: pl.grpo_loss(p, *map(jnp.asarray, (old, ref, adv, MASK)), clip_eps=0.2,
                                                     kl_coef=0.1)[0])(jnp.asarray(logp)))
  i, j, h = 0, 1, 1e-4
  step = np.zeros_like(logp)
  step[i, j] = h
  numeric = (_numpy_grpo(logp + step, old, ref, adv, MASK, 0.2, 0.1)
             - _numpy_grpo(logp - step, old, ref, adv, MASK, 0.2, 0.1)) / (2 * h)
  np.testing.assert_allclose(grad[i, j], numeric, rtol=1e-3)
  assert np.all(grad[MASK == 0] == 0)  # padding past an answer gets no gradient


def test_grpo_zero_advantages_give_zero_gradient_and_equal_policies_zero_kl():
  logp = jnp.asarray(RNG.normal(-1.0, 0.3, (B, L)))
  old = logp + 0.1
  zero = jnp.zeros(B)
  grad = jax.grad(lambda p: pl.grpo_loss(p, old, p, zero, jnp.asarray(MASK), kl_coef=0.0)[0])(logp)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
  loss, metrics = pl.grpo_loss(logp, logp, logp, zero, jnp.asarray(MASK), kl_coef=0.5)
  assert float(metrics["kl"]) == 0.0 and float(loss) == 0.0
  # the KL term alone pulls the policy towards the reference: its gradient is -(exp(ref - p) - 1) per token / tokens
  ref = logp - 0.3
  grad = jax.grad(lambda p: pl.grpo_loss(p, p, ref, zero, jnp.asarray(MASK), kl_coef=1.0)[0])(logp)
  np.testing.assert_allclose(grad, -(np.exp(ref - logp) - 1) * MASK / MASK.sum(), rtol=1e-5)


def test_token_logprobs_are_log_softmax_at_the_targets():
  logits = RNG.normal(0, 2, (2, 4, 7)).astype(np.float32)
  targets = RNG.integers(0, 7, (2, 4))
  got = np.asarray(pl.token_logprobs(jnp.asarray(logits), jnp.asarray(targets)))
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(got, np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0], rtol=1e-5)
  np.testing.assert_allclose(pl.sequence_logprobs(jnp.asarray(got), jnp.asarray(MASK[:2, :4])),
                             (got * MASK[:2, :4]).sum(-1), rtol=1e-6)


def test_dpo_loss_and_gradient_equal_numpy():
  chosen, rejected, ref_c, ref_r = (RNG.normal(-5, 2, 8) for _ in range(4))
  beta = 0.3
  loss, metrics = pl.dpo_loss(*map(jnp.asarray, (chosen, rejected, ref_c, ref_r)), beta=beta)
  margin = beta * ((chosen - ref_c) - (rejected - ref_r))
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-margin))), rtol=1e-5)
  np.testing.assert_allclose(metrics["reward_accuracy"], np.mean(margin > 0))
  sigmoid = 1 / (1 + np.exp(margin))  # d/dm -log sigmoid(m) = -sigmoid(-m)
  d_chosen, d_rejected = jax.grad(lambda c, r: pl.dpo_loss(c, r, jnp.asarray(ref_c), jnp.asarray(ref_r),
                                                           beta=beta)[0], argnums=(0, 1))(
      jnp.asarray(chosen), jnp.asarray(rejected))
  np.testing.assert_allclose(d_chosen, -beta * sigmoid / 8, rtol=1e-5)
  np.testing.assert_allclose(d_rejected, beta * sigmoid / 8, rtol=1e-5)
  # Weights 0 drop a pair (a group with no reward spread): the weighted means equal numpy's over the others.
  weights = np.array([1, 0, 1, 1, 0, 1, 1, 1], np.float32)
  loss, metrics = pl.dpo_loss(*map(jnp.asarray, (chosen, rejected, ref_c, ref_r)), beta=beta,
                              weights=jnp.asarray(weights))
  kept = weights > 0
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-margin[kept]))), rtol=1e-5)
  np.testing.assert_allclose(metrics["margin"], margin[kept].mean(), rtol=1e-5)


def test_rewards_by_name_on_synthetic_and_jsonl_records():
  from qwen3vl.data.synthetic import make_record
  from qwen3vl.train import rewards
  record = make_record("eval", 3)
  truth = record["meta"]["answer"]
  chosen = rewards.select("exact_match, format")
  assert rewards.score(chosen, record, f"  {truth.upper()}. ") == {"exact_match": 1.0, "format": 1.0}
  assert rewards.score(chosen, record, truth + " or not") == {"exact_match": 0.0, "format": 1.0}
  assert rewards.score(chosen, record, "") == {"exact_match": 0.0, "format": 0.0}
  jsonl = {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image>\nHow many?"},
                                                 {"from": "gpt", "value": "Three"}]}
  assert rewards.exact_match(jsonl, "three") == 1.0
  try:
    rewards.select("exact_match,lenght")
  except ValueError as e:
    assert "lenght" in str(e) and "exact_match" in str(e)
  else:
    raise AssertionError("an unknown reward name was accepted")

  @rewards.register("test_length")
  def length(record, answer):
    return -len(answer) / 10
  try:
    assert rewards.score(rewards.select("test_length"), record, "abc") == {"test_length": -0.3}
  finally:
    del rewards.REWARDS["test_length"]
