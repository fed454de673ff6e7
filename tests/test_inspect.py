"""qwen3vl.inspect on a random tiny MoE with two images in a left-padded batch: the recomputed attention
probabilities give the layer's own (fused-kernel) attention output, the trace's logits are the model's, image
tokens land on their grids, router load counts the top-k choices, and patch_image undoes the processor."""
import numpy as np
import pytest
from flax import nnx

from qwen3vl import inspect
from qwen3vl.config import ModelConfig
from qwen3vl.configs import models
from qwen3vl.data import chat
from qwen3vl.data.datasets import processors_for
from qwen3vl.data.tokenizer import Tokenizer
from qwen3vl.infer.assistant import user_turn
from qwen3vl.model import rope
from qwen3vl.model.stack import index_stack
from qwen3vl.model.vlm import init_model


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def case(request):
  cfg = ModelConfig.from_dict(models.get_config("tiny_moe").to_dict()).replace(attention_impl="xla",
                                                                              dtype=request.param)
  model = init_model(cfg, seed=1)
  processor = processors_for(cfg.vision, min_pixels=32 * 32, max_pixels=96 * 96)[0]
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (64, 96, 3), np.uint8), rng.integers(0, 256, (32, 64, 3), np.uint8)]
  pixels, grid = processor(images)
  tok = Tokenizer.builtin()
  rows = [tok.encode(chat.build_prompt([user_turn("Which shapes?", 2)], grid)), tok.encode("Hi there")]
  length = max(map(len, rows))
  ids = np.array([[tok.special_ids["pad"]] * (length - len(r)) + r for r in rows], np.int32)
  mask = (np.arange(length)[None] >= length - np.array([[len(r)] for r in rows])).astype(np.int32)
  vision = dict(pixel_values=pixels, image_grid_thw=grid, attention_mask=mask)
  return model, processor, images, ids, vision, inspect.trace(model, ids, **vision)


def _atol(model):
  return 1e-5 if model.config.dtype == "float32" else 5e-2


def test_trace_logits_are_the_models(case):
  model, _, _, ids, vision, t = case
  np.testing.assert_allclose(t.logits, np.asarray(model(ids, **vision)), atol=_atol(model))
  assert t.layer_inputs.shape == (3,) + ids.shape + (128,)
  assert t.router_logits.shape == (3,) + ids.shape + (8,)
  assert t.layer_inputs.dtype == t.router_logits.dtype == np.float32 and t.hidden_dtype == model.config.dtype


@pytest.mark.parametrize("layer", [0, 2])
def test_attention_probabilities_reproduce_the_layer_output(case, layer):
  model, _, _, ids, _, t = case
  probs = inspect.attention(model, t, layer)
  b, length = ids.shape
  assert probs.shape == (b, 4, length, length)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert not np.triu(probs, 1).any()  # causal
  assert not probs[0][:, ~(t.inputs.segment_ids[0] > 0)][:, :, t.inputs.segment_ids[0] > 0].any()  # no padding
  block = index_stack(model.layers, layer)
  text = model.config.text
  dtype = t.hidden_dtype
  cos, sin = rope.mrope_cos_sin(t.positions, text.head_dim, text.rope_theta, text.mrope_section, dtype)
  h = block.input_norm(t.layer_inputs[layer].astype(dtype))
  want, _ = block.attn(h, cos, sin, t.inputs.segment_ids)  # through kernels.attention
  _, _, v = block.attn.qkv(h, cos, sin)
  v = np.repeat(np.asarray(v, np.float32), 2, axis=2)  # 4 query heads over 2 kv heads
  mixed = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, -1).astype(dtype)
  got = block.attn.o_proj(mixed)
  valid = t.inputs.segment_ids > 0
  np.testing.assert_allclose(np.asarray(got, np.float32)[valid], np.asarray(want, np.float32)[valid],
                             atol=_atol(model))
  with pytest.raises(ValueError, match="out of range"):
    inspect.attention(model, t, 3)


def test_image_tokens_follow_the_grids(case):
  model, _, _, ids, vision, t = case
  grid = vision["image_grid_thw"]
  np.testing.assert_array_equal(grid, [[1, 4, 6], [1, 2, 4]])
  first, shape0 = inspect.image_tokens(ids[0], grid, image_token_id=model.config.image_token_id)
  second, shape1 = inspect.image_tokens(ids[0], grid, image_token_id=model.config.image_token_id, image=1)
  assert (shape0, shape1) == ((1, 2, 3), (1, 1, 2))
  assert len(first) == 6 and len(second) == 2 and first[-1] < second[0]
  # The visual tokens carry the merged vision features: each image's rows are the tower's rows in order.
  merged, _ = nnx.jit(lambda m, p, g: m.visual(p, g))(model, t.inputs.pixel_values, t.inputs.vision)
  np.testing.assert_allclose(t.embeddings[0, np.concatenate([first, second])], np.asarray(merged, np.float32),
                             atol=_atol(model))
  with pytest.raises(ValueError, match="image tokens"):
    inspect.image_tokens(ids[0], grid[:1], image_token_id=model.config.image_token_id)


def test_router_load_counts_top_k_choices():
  logits = np.zeros((2, 3, 4), np.float32)  # [layers, tokens, experts]
  logits[0, :, 1], logits[0, :, 2] = 2.0, 1.0  # layer 0: every token picks experts 1 and 2
  logits[1, 0, 0] = logits[1, 0, 3] = logits[1, 1, 0] = logits[1, 1, 1] = logits[1, 2, 0] = logits[1, 2, 2] = 1.0
  load = inspect.router_load(logits, 2)
  np.testing.assert_allclose(load, [[0, 0.5, 0.5, 0], [0.5, 1 / 6, 1 / 6, 1 / 6]])
  np.testing.assert_allclose(inspect.router_load(logits, 2, mask=[False, True, False])[1], [0.5, 0.5, 0, 0])


def test_router_load_of_a_trace_sums_to_one(case):
  model, _, _, _, _, t = case
  load = inspect.router_load(t.router_logits, model.config.text.num_experts_per_tok, t.inputs.segment_ids > 0)
  assert load.shape == (3, 8)
  np.testing.assert_allclose(load.sum(-1), 1.0)


def test_patch_image_undoes_the_processor(case):
  _, processor, images, _, vision, _ = case
  for k, image in enumerate(images):  # sizes are multiples of 32 within the pixel bounds: no resize
    got = inspect.patch_image(vision["pixel_values"], vision["image_grid_thw"], processor, image=k)
    np.testing.assert_allclose(got, image / 255.0, atol=1e-6)
