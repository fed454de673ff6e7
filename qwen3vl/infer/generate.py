"""Generation: a prefill that fills a preallocated KV cache, then one compiled `lax.while_loop` of decode steps.

Left padding puts every row's prompt end at the same cache slot, so the write index is one scalar for the whole
batch; each row keeps its own MRoPE offset (its position continues at its last prompt position + 1, as in HF
`generate`) and its padding stays masked, so a row decodes as if it were alone. The loop stops when every row
has produced a stop token; tokens after a row's stop are `pad_id`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3vl.infer.sampling import Sampling, next_token
from qwen3vl.model.inputs import prepare_inputs


def generate(model, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
             video_grid_thw=None, attention_mask=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, rng=None, stop_ids=(), pad_id: int = 0,
             bucket: int = 64):
  """New tokens [batch, max_new_tokens] (numpy int32), `pad_id` after each row's first stop token.

  input_ids [B, L] left-padded (attention_mask 0 on the padding), with image / video pad tokens expanded as the
  processor does; pixel values and grids as for `Qwen3VL.__call__`. temperature 0 is greedy. Prompts are
  left-padded (masked) to a multiple of `bucket` tokens so a new prompt length rarely means a new compilation.
  """
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  if mask.ndim == 2 and (mask[:, -1] == 0).any():
    raise ValueError("generate needs left padding: attention_mask must be 1 at the last position of every row")
  extra = -ids.shape[1] % max(int(bucket), 1)
  ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
  mask = np.pad(mask, ((0, 0), (extra, 0)))
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  context = model.config.text.max_position_embeddings
  if ids.shape[1] + max_new_tokens > context:
    raise ValueError(f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                     f"context of {context} tokens (text_config.max_position_embeddings)")
  inputs, deltas = prepare_inputs(model.config, ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                  pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                                  attention_mask=mask)
  length = ids.shape[1]
  # Row b's token at cache slot `length + i` has position base_b + i (HF: unpadded length + step + delta).
  base = (mask.sum(-1) + np.asarray(deltas).reshape(-1)).astype(np.int32)
  rng = jax.random.key(0) if rng is None else rng
  sampling = Sampling(temperature, top_k, top_p)
  graphdef, state = nnx.split(model)
  tokens = _generate(graphdef, state, inputs, jnp.asarray(mask, jnp.int32), jnp.asarray(base), rng,
                     jnp.asarray(list(stop_ids) or [-1], jnp.int32), max_new_tokens=int(max_new_tokens),
                     sampling=sampling, pad_id=int(pad_id))
  return np.asarray(tokens)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_new_tokens", "sampling", "pad_id"))
def _generate(graphdef, state, inputs, prompt_mask, base, rng, stop_ids, *, max_new_tokens, sampling, pad_id):
  model = nnx.merge(graphdef, state)
  b, length = prompt_mask.shape
  size = length + max_new_tokens
  logits, cache = model.prefill(inputs, size)
  slots = jnp.arange(size)
  prompt_valid = jnp.pad(prompt_mask, ((0, 0), (0, max_new_tokens))) > 0

  rng, key = jax.random.split(rng)
  first = next_token(logits, key, sampling)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stop_ids)

  def cond(carry):
    i, _, _, done, _, _, _ = carry
    return (i < max_new_tokens) & ~done.all()

  def body(carry):
    # `params` rides in the carry (loop-invariant, no copy): NNX modules must hold values of the loop's trace.
    i, token, cache, done, out, rng, params = carry  # token: written at slot length + i - 1, predicts output i
    index = length + i - 1
    valid = prompt_valid | ((slots >= length) & (slots <= index))[None]
    positions = jnp.broadcast_to((base + i - 1)[None, :, None], (3, b, 1))
    logits, cache = nnx.merge(graphdef, params).decode_step(token[:, None], positions, cache, index, valid)
    rng, key = jax.random.split(rng)
    new = jnp.where(done, pad_id, next_token(logits, key, sampling))
    out = out.at[:, i].set(new)
    return i + 1, new, cache, done | jnp.isin(new, stop_ids), out, rng, params

  carry = (jnp.int32(1), first, cache, done, out, rng, state)
  return jax.lax.while_loop(cond, body, carry)[4]
