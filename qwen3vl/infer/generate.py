"""Generation: a prompt fills a preallocated KV cache, then one compiled `lax.while_loop` of decode steps.

Left padding puts every row's prompt end at the same cache slot, so the write index is one scalar for the whole
batch; each row keeps its own MRoPE position (its last prompt position + 1 onwards, as in HF `generate`) and its
padding stays a masked hole, so a row decodes as if it were alone. The loop stops when every row has produced a
stop token; tokens after a row's stop are `pad_id` and are not written to the cache.

A conversation goes on from where it stopped: `return_state=True` hands back the `DecodeState` (cache, valid
slots, next positions, and each row's last sampled token, which is not in the cache yet), and a later call with
`state=` writes only the new tokens (starting with that last token) after it, so earlier turns are never
recomputed. Streaming calls a host function with each step's tokens from inside the compiled loop
(`io_callback`), so it costs no Python step per token when nobody listens.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from qwen3vl import sharding
from qwen3vl.infer.sampling import Sampling, next_token
from qwen3vl.model.inputs import ModelInputs, prepare_inputs
from qwen3vl.model.kv_cache import KVCache, visibility

_GROW = 256  # a conversation's cache grows in steps of this many slots (fewer shapes to compile)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """What a conversation keeps between calls (device arrays)."""
  cache: KVCache
  valid: jax.Array  # [B, S] bool: slots holding an entry (padding and post-stop slots are holes)
  index: jax.Array  # int32 scalar: the next free slot
  next_position: jax.Array  # [B] int32: MRoPE position of each row's next token
  last: jax.Array  # [B] int32: each row's last sampled token (not in the cache yet)
  layers: jax.Array  # [B] int32: decoder layers run by the decode steps so far (early exit makes it smaller)


def generate(model, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
             video_grid_thw=None, attention_mask=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, rng=None, stop_ids=(), pad_id: int = 0,
             suppress_ids=(),
             bucket: int = 64, kv_cache: str = "auto", stream: Callable[[int, np.ndarray], None] | None = None,
             state: DecodeState | None = None, return_state: bool = False, mesh=None):
  """New tokens [batch, max_new_tokens] (numpy int32), `pad_id` after each row's first stop token.

  input_ids [B, L] left-padded (attention_mask 0 on the padding), with image / video pad tokens expanded as the
  processor does; pixel values and grids as for `Qwen3VL.__call__`. temperature 0 is greedy; `suppress_ids` are
  never chosen. Prompts are
  left-padded (masked) to a multiple of `bucket` tokens so a new prompt length rarely means a new compilation.
  kv_cache "int8" stores the cache in int8 with per-(slot, head) scales. `stream(step, tokens [B])` is called
  as each step's tokens are chosen. With `state` (from a call with return_state=True) input_ids continue that
  conversation and the result is (tokens, new state); the old state's buffers are reused (do not use it again).
  With a `mesh` (qwen3vl.sharding.make_mesh) the parameters are placed by the sharding rules and the KV cache
  follows them (batch over the data axes, kv heads over tensor).
  """
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  if mask.ndim == 2 and (mask[:, -1] == 0).any():
    raise ValueError("generate needs left padding: attention_mask must be 1 at the last position of every row")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  extra = -ids.shape[1] % max(int(bucket), 1)
  ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
  mask = np.pad(mask, ((0, 0), (extra, 0)))
  context = model.config.text.max_position_embeddings
  used = 0 if state is None else int(np.max(state.next_position))
  if used + ids.shape[1] + max_new_tokens > context:
    raise ValueError(f"{f'{used} tokens of conversation + ' if used else ''}a prompt of {ids.shape[1]} tokens + "
                     f"max_new_tokens={max_new_tokens} exceeds the model's context of {context} tokens "
                     "(text_config.max_position_embeddings)")
  if state is not None and state.valid.shape[0] != ids.shape[0]:
    raise ValueError(f"the conversation state has batch {state.valid.shape[0]}, input_ids {ids.shape[0]}")
  inputs, deltas = prepare_inputs(model.config, ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                  pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                                  attention_mask=mask)
  # Positions after this chunk advance by its unpadded length + its MRoPE delta (HF: length + rope_deltas).
  advance = jnp.asarray(mask.sum(-1) + np.asarray(deltas).reshape(-1), jnp.int32)
  static = dict(max_new_tokens=int(max_new_tokens), sampling=Sampling(temperature, top_k, top_p,
                                                                   tuple(sorted({int(i) for i in suppress_ids}))),
                pad_id=int(pad_id), stream=stream is not None)
  args = (inputs, jnp.asarray(mask, jnp.int32), advance, jax.random.key(0) if rng is None else rng,
          jnp.asarray(list(stop_ids) or [-1], jnp.int32))
  graphdef, params = nnx.split(model)
  if mesh is not None:
    placed = jax.device_put(nnx.to_pure_dict(params), sharding.param_shardings(params, mesh))
    nnx.replace_by_pure_dict(params, placed)
  with _listening(stream), (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
    if state is None:
      tokens, state = _first(graphdef, params, *args, size=ids.shape[1] + int(max_new_tokens), kv_dtype=kv_cache,
                             **static)
    else:
      state = _grow(state, int(state.index) + ids.shape[1] + int(max_new_tokens))
      tokens, state = _more(graphdef, params, state, *args, **static)
  tokens = np.asarray(tokens)
  return (tokens, state) if return_state else tokens


# ------------------------------------------------------------------------------------------------ streaming
_listener: list[Callable[[int, np.ndarray], None] | None] = [None]


class _listening:
  """Routes the compiled loop's callbacks to `fn` for the duration of one call (the compiled code only knows
  that somebody listens, so one compilation serves every listener)."""

  def __init__(self, fn):
    self.fn = fn

  def __enter__(self):
    self.prev, _listener[0] = _listener[0], self.fn

  def __exit__(self, *exc):
    jax.effects_barrier()  # every callback of this call has run
    _listener[0] = self.prev


def _emit(step, tokens):
  if _listener[0] is not None:
    _listener[0](int(step), np.asarray(tokens))


# ------------------------------------------------------------------------------------------------- compiled
_STATIC = ("max_new_tokens", "sampling", "pad_id", "stream")


@functools.partial(jax.jit, static_argnums=0, static_argnames=_STATIC + ("size", "kv_dtype"))
def _first(graphdef, params, inputs, mask, advance, rng, stop_ids, *, size, kv_dtype, **static):
  model = nnx.merge(graphdef, params)
  b, length = mask.shape
  logits, cache = model.prefill(inputs, model.new_cache(b, size, kv_dtype))
  valid = jnp.pad(mask > 0, ((0, 0), (0, size - length)))
  state = DecodeState(cache, valid, jnp.int32(length), advance, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32))
  return _decode(graphdef, params, logits, state, rng, stop_ids, **static)


@functools.partial(jax.jit, static_argnums=0, static_argnames=_STATIC, donate_argnames=("state",))
def _more(graphdef, params, state, inputs, mask, advance, rng, stop_ids, **static):
  model = nnx.merge(graphdef, params)
  length = mask.shape[1]
  valid = jax.lax.dynamic_update_slice(state.valid, mask > 0, (0, state.index))
  inputs = dataclasses.replace(inputs, positions=inputs.positions + state.next_position[None, :, None])
  logits, cache = model.extend(inputs, state.cache, state.index, visibility(valid, state.index, length))
  state = DecodeState(cache, valid, state.index + length, state.next_position + advance, state.last, state.layers)
  return _decode(graphdef, params, logits, state, rng, stop_ids, **static)


def _decode(graphdef, params, logits, state, rng, stop_ids, *, max_new_tokens, sampling, pad_id, stream):
  """First token from the prompt's logits, then the while loop; returns (tokens [B, N], final state)."""
  b = logits.shape[0]
  rng, key = jax.random.split(rng)
  first = next_token(logits, key, sampling)
  if stream:
    io_callback(_emit, None, 0, first, ordered=True)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  state = dataclasses.replace(state, last=first)
  done = jnp.isin(first, stop_ids)

  def cond(carry):
    i, done = carry[0], carry[1]
    return (i < max_new_tokens) & ~done.all()

  def body(carry):
    # `params` rides in the carry (loop-invariant, no copy): NNX modules must hold values of the loop's trace.
    i, done, out, st, rng, params = carry
    model = nnx.merge(graphdef, params)
    # Rows still going write their last token at slot `index`; finished rows leave a hole there.
    valid = st.valid.at[:, st.index].set(~done)
    positions = jnp.broadcast_to(st.next_position[None, :, None], (3, b, 1))
    inputs = ModelInputs(st.last[:, None], positions, None)
    logits, cache, depth = model.extend(inputs, st.cache, st.index, visibility(valid, st.index, 1), return_depth=True)
    rng, key = jax.random.split(rng)
    new = jnp.where(done, pad_id, next_token(logits, key, sampling))
    if stream:
      io_callback(_emit, None, i, new, ordered=True)
    out = out.at[:, i].set(new)
    st = DecodeState(cache, valid, st.index + 1, st.next_position + (~done).astype(jnp.int32),
                     jnp.where(done, st.last, new), st.layers + jnp.where(done, 0, depth))
    return i + 1, done | jnp.isin(new, stop_ids), out, st, rng, params

  carry = (jnp.int32(1), done, out, state, rng, params)
  _, _, out, state, _, _ = jax.lax.while_loop(cond, body, carry)
  return out, state


def _grow(state: DecodeState, needed: int) -> DecodeState:
  """The state with a cache of at least `needed` slots (rounded up to a multiple of _GROW)."""
  size = state.valid.shape[1]
  if needed <= size:
    return state
  extra = -(-needed // _GROW) * _GROW - size
  cache = jax.tree.map(lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 3)), state.cache)
  return dataclasses.replace(state, cache=cache, valid=jnp.pad(state.valid, ((0, 0), (0, extra))))
