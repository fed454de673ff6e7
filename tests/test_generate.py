"""KV-cache generation against recomputing the whole forward for every new token, on the golden tiny models
(left-padded batch with two odd images and a video), batched against per row, sampling switches, stop tokens."""
import os

import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURES
from qwen3vl import hf
from qwen3vl.infer.generate import generate

MODELS = os.path.join(FIXTURES, "models")
INPUTS = dict(np.load(os.path.join(MODELS, "inputs.npz")))
NEW = 6


def _model(kind):
  return hf.load_pretrained(os.path.join(MODELS, kind), attention_impl="xla")


def _vision(inputs):
  return {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}


def _greedy_by_recompute(model, ids, mask, vision, n):
  """Reference: the full forward over prompt + tokens so far, argmax of the last position, n times."""
  ids, mask, out = np.asarray(ids), np.asarray(mask), []
  for _ in range(n):
    logits = np.asarray(model(ids, attention_mask=mask, **vision))
    token = logits[:, -1].argmax(-1)
    out.append(token)
    ids = np.concatenate([ids, token[:, None]], 1)
    mask = np.concatenate([mask, np.ones_like(mask[:, :1])], 1)
  return np.stack(out, 1)


def test_greedy_cache_equals_recompute():
  """Independent of HF: each reference step recompiles the forward, so few steps (MoE: the HF test below)."""
  model = _model("dense")
  ids, mask, vision = INPUTS["input_ids"], INPUTS["attention_mask"], _vision(INPUTS)
  got = generate(model, ids, attention_mask=mask, max_new_tokens=4, **vision)
  want = _greedy_by_recompute(model, ids, mask, vision, 4)
  np.testing.assert_array_equal(got, want)


def test_batched_equals_per_row_text_only():
  model = _model("tied")
  ids, mask = INPUTS["text_input_ids"], INPUTS["text_attention_mask"]  # row 1 is left-padded
  both = generate(model, ids, attention_mask=mask, max_new_tokens=NEW)
  for row in range(2):
    keep = mask[row] > 0
    alone = generate(model, ids[row:row + 1, keep], max_new_tokens=NEW)
    np.testing.assert_array_equal(both[row:row + 1], alone)


def test_sampling_switches_and_stop_tokens():
  model = _model("tied")
  ids, mask = INPUTS["text_input_ids"], INPUTS["text_attention_mask"]
  greedy = generate(model, ids, attention_mask=mask, max_new_tokens=NEW)
  top1 = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, temperature=0.7, top_k=1)
  np.testing.assert_array_equal(top1, greedy)  # top-k 1 is greedy whatever the temperature
  tiny_p = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, temperature=1.0, top_p=1e-6)
  np.testing.assert_array_equal(tiny_p, greedy)  # top-p keeps at least the most likely token
  import jax
  a = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, temperature=5.0, rng=jax.random.key(1))
  b = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, temperature=5.0, rng=jax.random.key(2))
  assert a.shape == b.shape == (2, NEW) and not np.array_equal(a, b)  # hot sampling depends on the key
  banned = sorted(set(a.ravel().tolist()) | set(greedy.ravel().tolist()))
  c = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, temperature=5.0, rng=jax.random.key(1),
               suppress_ids=banned)
  d = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, suppress_ids=banned)
  assert not set(c.ravel().tolist()) & set(banned) and not set(d.ravel().tolist()) & set(banned)
  stop = int(greedy[0, 2])
  stopped = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, stop_ids=[stop], pad_id=-1)
  first = int(np.flatnonzero(greedy[0] == stop)[0])
  np.testing.assert_array_equal(stopped[0, :first + 1], greedy[0, :first + 1])
  assert (stopped[0, first + 1:] == -1).all()


def test_bad_requests_are_refused():
  model = _model("tied")
  with pytest.raises(ValueError, match="left padding"):
    generate(model, np.ones((1, 4), np.int32), attention_mask=np.array([[1, 1, 1, 0]]))
  with pytest.raises(ValueError, match="exceeds the model's context of 4096"):
    generate(model, np.ones((1, 4000), np.int32), max_new_tokens=100)


@pytest.mark.parametrize("kind", ["dense", "tied", "moe"])
def test_greedy_equals_hf_generate(kind):
  """Token for token against transformers' greedy `generate` (fixtures: make_model_fixtures.py --generate)."""
  model, ref = _model(kind), dict(np.load(os.path.join(MODELS, f"generate_{kind}.npz")))
  n = ref["generated"].shape[1]
  got = generate(model, INPUTS["input_ids"], attention_mask=INPUTS["attention_mask"], max_new_tokens=n,
                 **_vision(INPUTS))
  np.testing.assert_array_equal(got, ref["generated"])
  got = generate(model, INPUTS["text_input_ids"], attention_mask=INPUTS["text_attention_mask"], max_new_tokens=n)
  np.testing.assert_array_equal(got, ref["text_generated"])


def test_prompt_buckets_do_not_change_the_output():
  model = _model("moe")
  ids, mask = INPUTS["text_input_ids"], INPUTS["text_attention_mask"]
  exact = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, bucket=1)
  np.testing.assert_array_equal(generate(model, ids, attention_mask=mask, max_new_tokens=NEW, bucket=16), exact)


def _alone(model, ids, n, **kw):
  return generate(model, np.asarray(ids, np.int32)[None], max_new_tokens=n, **kw)[0]


def test_conversation_state_continues_as_one_long_prompt():
  """Turn 2 over the kept cache equals one-shot generation on prompt + answer + new text, per row: row 0 stops
  early (its post-stop slots are holes), row 1 is left-padded in both turns."""
  model = _model("dense")
  ids, mask = INPUTS["text_input_ids"], INPUTS["text_attention_mask"]
  stop = int(generate(model, ids, attention_mask=mask, max_new_tokens=NEW)[0, 1])
  first, state = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, stop_ids=[stop], pad_id=-1,
                          return_state=True)
  assert first[0, 1] == stop and (first[0, 2:] == -1).all()
  more = [[7, 9, 11], [12, 40, 41, 42, 43]]
  chunk = np.zeros((2, 6), np.int32)
  chunk_mask = np.zeros_like(chunk)
  history = []
  for r in range(2):
    answer = [int(t) for t in first[r] if t != -1]
    row = [answer[-1]] + more[r]  # the last sampled token is not in the cache yet: it opens the next chunk
    chunk[r, -len(row):], chunk_mask[r, -len(row):] = row, 1
    history.append(list(ids[r][mask[r] > 0]) + answer + more[r])
  second, state = generate(model, chunk, attention_mask=chunk_mask, max_new_tokens=NEW, stop_ids=[stop],
                           pad_id=-1, state=state, return_state=True)
  for r in range(2):
    np.testing.assert_array_equal(second[r], _alone(model, history[r], NEW, stop_ids=[stop], pad_id=-1))


def test_conversation_with_vision_in_a_later_turn():
  """An image and a video arriving in turn 2: MRoPE positions continue after turn 1, DeepStack applies."""
  model = _model("dense")
  text = INPUTS["text_input_ids"][0]
  first, state = generate(model, text[None], max_new_tokens=3, return_state=True)
  prompt = INPUTS["input_ids"][0]  # row 0 holds image 0 (60 patches) and the video
  vision = dict(pixel_values=INPUTS["pixel_values"][:60], image_grid_thw=INPUTS["image_grid_thw"][:1],
                pixel_values_videos=INPUTS["pixel_values_videos"], video_grid_thw=INPUTS["video_grid_thw"])
  chunk = np.concatenate([first[0, -1:], prompt])[None]
  second = generate(model, chunk, max_new_tokens=NEW, state=state, **vision)
  whole = np.concatenate([text, first[0], prompt])
  np.testing.assert_array_equal(second[0], _alone(model, whole, NEW, **vision))


def test_streaming_sends_every_token_as_it_is_chosen():
  model = _model("tied")
  ids, mask = INPUTS["text_input_ids"], INPUTS["text_attention_mask"]
  seen = []
  got = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, stream=lambda i, t: seen.append((i, t)))
  assert [i for i, _ in seen] == list(range(NEW))
  np.testing.assert_array_equal(np.stack([t for _, t in seen], 1), got)


def test_int8_cache_quarters_memory_and_keeps_the_choices():
  import jax
  import jax.numpy as jnp
  from qwen3vl.model.kv_cache import KVCache, visibility
  b, s, t, hkv, g, d = 2, 37, 3, 2, 3, 64
  keys = jax.random.split(jax.random.key(0), 3)
  k, v = (jax.random.normal(key, (b, s, hkv, d)) for key in keys[:2])
  q = jax.random.normal(keys[2], (b, t, hkv * g, d))
  valid = jnp.arange(s)[None] < jnp.array([[30], [25]])
  mask = visibility(valid, 22, t)
  exact, int8 = (KVCache.empty(1, b, s, hkv, d, jnp.float32, kv_dtype) for kv_dtype in ("auto", "int8"))
  assert int8.nbytes() < 0.3 * exact.nbytes()
  want, got = (c.write(0, k, v, 0).attend(0, q, mask) for c in (exact, int8))
  ref = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(jnp.where(
      mask[:, None, None], jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, hkv, g, d), k) / d ** 0.5, -jnp.inf)),
      v).reshape(b, t, hkv * g, d)
  np.testing.assert_allclose(want, ref, atol=1e-5)
  assert float(jnp.abs(got - want).max()) < 0.02 * float(jnp.abs(want).max())
  # Teacher-forced decode steps over a prompt cached in int8 vs float32: the same next-token choices. (Free-running
  # greedy text is no measure on a random model: its top-2 logits are near ties, and one flip changes the rest.)
  import dataclasses
  from qwen3vl.model.inputs import prepare_inputs
  model, n, steps = _model("dense"), 11, 12
  ids = np.concatenate([INPUTS["text_input_ids"][:1], np.arange(20, 20 + steps)[None]], 1).astype(np.int32)
  inputs, _ = prepare_inputs(model.config, ids)
  part = lambda a, b: dataclasses.replace(inputs, input_ids=inputs.input_ids[:, a:b],
                                          positions=inputs.positions[:, :, a:b], segment_ids=inputs.segment_ids[:, a:b])
  logits = {}
  extend = nnx.jit(lambda model, step, cache, j, mask: model.extend(step, cache, j, mask))
  for kv_dtype in ("auto", "int8"):
    _, cache = model.prefill(part(0, n), model.new_cache(1, n + steps, kv_dtype))
    out = []
    for j in range(n, n + steps):
      step = dataclasses.replace(part(j, j + 1), segment_ids=None)
      lg, cache = extend(model, step, cache, jnp.int32(j), visibility(jnp.ones((1, n + steps), bool), j, 1))
      out.append(np.asarray(lg))
    logits[kv_dtype] = np.stack(out, 1)
  np.testing.assert_array_equal(logits["int8"].argmax(-1), logits["auto"].argmax(-1))
  assert np.abs(logits["int8"] - logits["auto"]).max() < 0.05 * logits["auto"].std()
  with pytest.raises(ValueError, match="kv cache dtype"):
    generate(model, ids, kv_cache="fp8")
