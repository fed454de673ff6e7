"""Token copies laid out by expert, and the experts' MLP over padded blocks for backends without a grouped matmul.

`expert_layout` puts each token copy (token t, choice j) in a row of its expert's group: groups in expert order,
each padded to whole blocks of `block` rows (zero rows pad the last block; block=1 is the plain sorted layout
that `jax.lax.ragged_dot` takes). Rows move in and out of the layout by gathers both ways (`gather_rows`: its
VJP is the gather by the inverse map, not a scatter-add, which XLA:CPU runs row by row).

`blocked_experts` (`ModelConfig.moe_impl="blocked"`, the CPU default) runs each used block through its expert's
whole MLP (a scan over experts around a loop over that expert's blocks): the work is the routed rows plus under
one block per expert, where XLA:CPU's ragged_dot runs every expert over every row (G x the work), and a block's
intermediates stay in cache. The VJP loops alike: input gradients per block, each expert's weight gradients
summed in a loop carry (not written per block). Fused, it has no `moe_gate_up` tag for remat policies (the CPU
overlay's remat is `none`); only its output is tagged `moe_down`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertLayout(NamedTuple):
  row: jax.Array          # [T, k] the layout row of each token copy; num_rows where the expert is not here
  copy: jax.Array         # [num_rows] the copy (t * k + j) in each row; T * k in padding rows
  group_sizes: jax.Array  # [G] copies per expert
  first_block: jax.Array  # [G] each expert's first block (of `block` rows)
  num_blocks: jax.Array   # [G] each expert's blocks


def expert_layout(expert_ids: jax.Array, num_experts: int, block: int = 1) -> ExpertLayout:
  """expert_ids [T, k] (ids outside 0..num_experts-1 get no row: another device's experts)."""
  t, k = expert_ids.shape
  copies, g = t * k, num_experts
  flat = expert_ids.reshape(-1)
  flat = jnp.where((flat >= 0) & (flat < g), flat, g)  # other experts sort last, outside every group
  sizes = jnp.bincount(flat, length=g).astype(jnp.int32)
  blocks = (sizes + block - 1) // block
  first_block = jnp.cumsum(blocks) - blocks
  num_rows = (copies + g * (block - 1)) // block * block  # static bound: sum(ceil(s / b)) <= (sum(s) + g(b - 1)) / b
  order = jnp.argsort(flat, stable=True)  # sorted position -> copy
  sorted_ids = flat[order]
  expert = jnp.minimum(sorted_ids, g - 1)
  offset = jnp.arange(copies) - (jnp.cumsum(sizes) - sizes)[expert]  # position within the expert's group
  sorted_row = jnp.where(sorted_ids < g, first_block[expert] * block + offset, num_rows)
  row = jnp.zeros(copies, jnp.int32).at[order].set(sorted_row.astype(jnp.int32))
  copy = jnp.full(num_rows, copies, jnp.int32).at[row].set(jnp.arange(copies, dtype=jnp.int32), mode="drop")
  return ExpertLayout(row.reshape(t, k), copy, sizes, first_block.astype(jnp.int32), blocks.astype(jnp.int32))


@jax.custom_vjp
def gather_rows(x: jax.Array, rows: jax.Array, inverse: jax.Array) -> jax.Array:
  """x[rows] (zero where a row index is out of range), where inverse [len(x), n] lists the output rows that read
  each row of x (out of range: none). The VJP gathers the cotangent by `inverse` and sums over n."""
  return jnp.take(x, rows, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x, rows, inverse):
  return gather_rows(x, rows, inverse), inverse


def _gather_rows_bwd(inverse, g):
  return jnp.take(g, inverse, axis=0, mode="fill", fill_value=0).sum(1), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def to_layout(x: jax.Array, layout: ExpertLayout) -> jax.Array:
  """x [T, H] -> [num_rows, H]: each row holds its copy's token (zeros in padding)."""
  return gather_rows(x, layout.copy // layout.row.shape[1], layout.row)


def from_layout(y: jax.Array, layout: ExpertLayout) -> jax.Array:
  """y [num_rows, H] -> [T, k, H]: each token copy's row (zeros for copies not routed here)."""
  t, k = layout.row.shape
  return gather_rows(y, layout.row.reshape(-1), layout.copy[:, None]).reshape(t, k, -1)


def block_rows(copies: int, num_experts: int, hidden: int, width: int) -> int:
  """Rows per block for `blocked_experts`: 128, more when the expert matrices are small (each block's matmuls
  should outweigh a loop step's overhead: 2^25 multiply-adds), never past the mean rows per expert (padding)."""
  rows = max(128, 1 << max(0, (2**25 // (hidden * width)).bit_length() - 1))
  mean = 1 << max(0, (-(-copies // num_experts) - 1).bit_length())  # the power of two at or above
  return max(8, min(rows, mean))


def swiglu(h: jax.Array) -> jax.Array:
  """The experts' activation on the fused projection [..., 2I] (gate first): silu(gate) * up."""
  gate, up = jnp.split(h, 2, axis=-1)
  return jax.nn.silu(gate) * up


def blocked_experts(x: jax.Array, gate_up: jax.Array, down: jax.Array, layout: ExpertLayout, block: int) -> jax.Array:
  """x [num_rows, H] in `layout` (made with `block`) -> [num_rows, H]: each of an expert's blocks through its
  MLP, swiglu(x @ gate_up[e]) @ down[e]; rows past the used blocks come out as zeros."""
  # Under shard_map, give the operands one set of varying mesh axes (adding a zero of them all), so the loop
  # carries inside type-check; the casts' transposes sum the weight gradients over those axes.
  zero = sum(jnp.zeros_like(a, jnp.float32, shape=()) for a in (x, gate_up, down, layout.group_sizes))
  cast = lambda a: a + zero.astype(a.dtype)
  return _blocked_experts(cast(x), cast(gate_up), cast(down), layout, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_experts(x, gate_up, down, layout, block):
  return _blocked_experts_fwd(x, gate_up, down, layout, block)[0]


def _block_access(block):
  """(rows(a, b): block b of a, put(a, v, b): a with block b set to v, in place inside a loop)."""
  return (lambda a, b: jax.lax.dynamic_slice_in_dim(a, b * block, block),
          lambda a, v, b: jax.lax.dynamic_update_slice_in_dim(a, v, b * block, 0))


def _blocked_experts_fwd(x, gate_up, down, layout, block):
  rows, put = _block_access(block)

  def expert(carry, e):  # a scan over experts around a loop over the expert's blocks
    def one(b, carry):
      h_all, y_all = carry
      h = rows(x, b) @ gate_up[e]
      return put(h_all, h, b), put(y_all, swiglu(h) @ down[e], b)
    first = layout.first_block[e]
    return jax.lax.fori_loop(first, first + layout.num_blocks[e], one, carry), None
  zeros = (jnp.zeros_like(x, shape=(x.shape[0], gate_up.shape[-1])), jnp.zeros_like(x))
  (h, y), _ = jax.lax.scan(expert, zeros, jnp.arange(gate_up.shape[0]))
  return y, (x, h, gate_up, down, layout)  # h [num_rows, 2I] kept for the backward


def _blocked_experts_bwd(block, res, dy):
  x, h, gate_up, down, layout = res
  rows, put = _block_access(block)
  dot32 = lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)

  def expert(dx, e):
    def one(b, carry):
      dx, d_gate_up, d_down = carry  # the expert's weight gradients, summed in float32 over its blocks
      act, act_vjp = jax.vjp(swiglu, rows(h, b))
      d_down = d_down + dot32(act.T, rows(dy, b))
      dh, = act_vjp(rows(dy, b) @ down[e].T)
      d_gate_up = d_gate_up + dot32(rows(x, b).T, dh)
      return put(dx, dh @ gate_up[e].T, b), d_gate_up, d_down
    zeros = (jnp.zeros_like(gate_up[e], jnp.float32), jnp.zeros_like(down[e], jnp.float32))
    first = layout.first_block[e]
    dx, d_gate_up, d_down = jax.lax.fori_loop(first, first + layout.num_blocks[e], one, (dx, *zeros))
    return dx, (d_gate_up.astype(gate_up.dtype), d_down.astype(down.dtype))
  dx, (d_gate_up, d_down) = jax.lax.scan(expert, jnp.zeros_like(x), jnp.arange(gate_up.shape[0]))
  return dx, d_gate_up, d_down, None


_blocked_experts.defvjp(_blocked_experts_fwd, _blocked_experts_bwd)
