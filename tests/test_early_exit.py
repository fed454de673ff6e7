"""Early exit while decoding (`exit_layers`, `exit_threshold`): a threshold of 1.0 gives the full model's tokens
and depth; a threshold that every token passes stops every decode step after the first exit layer, and then its
tokens are exactly the greedy choices of the LM head on that layer's hidden states (recomputed over the whole
sequence: layer 0 only reads layer 0's cache, which an exit never changes); depth is counted per token."""
import numpy as np
import pytest

from qwen3vl.configs import models
from qwen3vl.config import ModelConfig
from qwen3vl.infer import generate
from qwen3vl.model.inputs import prepare_inputs
from qwen3vl.model.vlm import init_model, with_runtime

NEW = 10


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig.from_dict(models.get_config("tiny").to_dict()).replace(attention_impl="xla")
  return init_model(cfg, seed=3)


def _ids():
  return np.random.default_rng(0).integers(0, 250, (1, 20)).astype(np.int32)


def test_threshold_one_is_the_full_model(model):
  full, state = generate(model, _ids(), max_new_tokens=NEW, return_state=True)
  gated, gated_state = generate(with_runtime(model, exit_layers=(0, 1), exit_threshold=1.0), _ids(),
                                max_new_tokens=NEW, return_state=True)
  np.testing.assert_array_equal(gated, full)
  layers = model.config.text.num_hidden_layers
  assert int(state.layers[0]) == int(gated_state.layers[0]) == layers * (NEW - 1)  # decode steps only


def test_exiting_after_layer_0_decodes_with_layer_0s_head(model):
  early = with_runtime(model, exit_layers=(0,), exit_threshold=1e-6)  # every token is confident enough
  tokens, state = generate(early, _ids(), max_new_tokens=NEW, return_state=True)
  assert int(state.layers[0]) == NEW - 1  # one layer per decode step
  sequence = np.concatenate([_ids(), tokens], axis=1)
  inputs, _ = prepare_inputs(model.config, sequence)
  _, extras = model.forward(inputs, return_hidden_states=True)
  choice = np.asarray(model.logits(model.norm(extras["hidden_states"][0])).argmax(-1))  # [1, L]
  # Token i + 1 (i >= 1; token 0 comes from the full-depth prefill) is the choice at token i's position.
  at = _ids().shape[1] + np.arange(NEW - 1)
  np.testing.assert_array_equal(tokens[0, 1:], choice[0, at])


def test_exit_layers_are_validated(model):
  with pytest.raises(ValueError, match="exit_layers"):
    with_runtime(model, exit_layers=(2,))  # the last layer of 3: nothing left to skip
  with pytest.raises(ValueError, match="exit_threshold"):
    with_runtime(model, exit_layers=(0,), exit_threshold=0.0)
