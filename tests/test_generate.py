"""KV-cache generation against recomputing the whole forward for every new token, on the golden tiny models
(left-padded batch with two odd images and a video), batched against per row, sampling switches, stop tokens."""
import os

import numpy as np
import pytest

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
