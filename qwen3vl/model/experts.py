"""Token copies laid out by expert, and the experts' MLP over padded blocks for backends without a grouped matmul.

`expert_layout` puts each token copy (token t, choice j) in a row of its expert's group: groups in expert order,
each padded to whole blocks of `block` rows (zero rows pad the last block; block=1 is the plain sorted layout
that `jax.lax.ragged_dot` takes). Rows move in and out of the layout by gathers both ways (`gather_rows`: its
VJP is the gather by the inverse map, not a scatter-add, which XLA:CPU runs row by row).

`blocked_experts` (`ModelConfig.moe_impl="blocked"`, the CPU default) runs each block through its expert's whole
MLP in one scan over blocks that skips the blocks past the used ones (`lax.cond`): the work is the routed rows
plus under one block per expert, where XLA:CPU's ragged_dot runs every expert over every row (G x the work), and
a block's intermediates stay in cache. The VJP is one more scan: input gradients per block, the expert's weight
gradients accumulated in place. Fused, it has no `moe_gate_up` tag for remat policies (the CPU overlay's remat
is `none`); only its output is tagged `moe_down`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertLayout(NamedTuple):
  row: jax.Array           # [T, k] the layout row of each token copy; num_rows where the expert is not here
  copy: jax.Array          # [num_rows] the copy (t * k + j) in each row; T * k in padding rows
  group_sizes: jax.Array   # [G] copies per expert
  block_expert: jax.Array  # [num_rows // block] the expert of each block
  used_blocks: jax.Array   # [] blocks that hold copies; the rest are skipped

  @property
  def block(self) -> int:
    return self.copy.shape[0] // self.block_expert.shape[0]


def expert_layout(expert_ids: jax.Array, num_experts: int, block: int = 1) -> ExpertLayout:
  """expert_ids [T, k] (ids outside 0..num_experts-1 get no row: another device's experts)."""
  t, k = expert_ids.shape
  copies, g = t * k, num_experts
  flat = expert_ids.reshape(-1)
  flat = jnp.where((flat >= 0) & (flat < g), flat, g)  # other experts sort last, outside every group
  sizes = jnp.bincount(flat, length=g).astype(jnp.int32)
  padded = (sizes + block - 1) // block * block
  end, padded_end = jnp.cumsum(sizes), jnp.cumsum(padded)
  num_blocks = (copies + g * (block - 1)) // block  # static bound: sum(ceil(s / block)) <= (sum(s) + g(block - 1)) / block
  order = jnp.argsort(flat, stable=True)  # sorted position -> copy
  expert = jnp.minimum(flat[order], g - 1)
  sorted_row = jnp.where(flat[order] < g, (padded_end - padded)[expert] + jnp.arange(copies) - (end - sizes)[expert],
                         num_blocks * block)
  row = jnp.zeros(copies, jnp.int32).at[order].set(sorted_row.astype(jnp.int32))
  copy = jnp.full(num_blocks * block, copies, jnp.int32).at[row].set(jnp.arange(copies, dtype=jnp.int32), mode="drop")
  block_expert = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right")
  return ExpertLayout(row.reshape(t, k), copy, sizes, jnp.minimum(block_expert, g - 1).astype(jnp.int32),
                      padded_end[-1] // block)


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


def swiglu(h: jax.Array) -> jax.Array:
  """The experts' activation on the fused projection [..., 2I] (gate first): silu(gate) * up."""
  gate, up = jnp.split(h, 2, axis=-1)
  return jax.nn.silu(gate) * up


def blocked_experts(x: jax.Array, gate_up: jax.Array, down: jax.Array, layout: ExpertLayout) -> jax.Array:
  """x [num_rows, H] in `layout` -> [num_rows, H]: each block through its expert's MLP, swiglu(x @ gate_up[e])
  @ down[e]; the blocks past `used_blocks` come out as zeros."""
  # Under shard_map, give the operands one set of varying mesh axes (adding a zero of them all), so the cond
  # branches and scan carries inside type-check; the casts' transposes sum the weight gradients over those axes.
  zero = sum(jnp.zeros_like(a, jnp.float32, shape=()) for a in (x, gate_up, down, layout.used_blocks))
  cast = lambda a: a + zero.astype(a.dtype)
  return _blocked_experts(cast(x), cast(gate_up), cast(down), layout)


@jax.custom_vjp
def _blocked_experts(x, gate_up, down, layout):
  return _blocked_experts_fwd(x, gate_up, down, layout)[0]


def _blocks(x, layout):
  return x.reshape(layout.block_expert.shape[0], layout.block, x.shape[-1])


def _blocked_experts_fwd(x, gate_up, down, layout):
  def one(_, a):
    xb, e, b = a

    def used():
      h = xb @ gate_up[e]
      return h, swiglu(h) @ down[e]
    skipped = lambda: (jnp.zeros_like(xb, shape=(xb.shape[0], gate_up.shape[-1])), jnp.zeros_like(xb))
    return None, jax.lax.cond(b < layout.used_blocks, used, skipped)
  blocks = jnp.arange(layout.block_expert.shape[0])
  h, y = jax.lax.scan(one, None, (_blocks(x, layout), layout.block_expert, blocks))[1]
  return y.reshape(x.shape), (x, h, gate_up, down, layout)  # h [blocks, block, 2I] kept for the backward


def _blocked_experts_bwd(res, dy):
  x, h, gate_up, down, layout = res
  dot32 = lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)

  def one(d_weights, a):
    xb, hb, dyb, e, b = a

    def used(d_weights):
      d_gate_up, d_down = d_weights
      act, act_vjp = jax.vjp(swiglu, hb)
      d_down = jax.lax.dynamic_update_index_in_dim(d_down, d_down[e] + dot32(act.T, dyb), e, 0)  # in place
      dh, = act_vjp(dyb @ down[e].T)
      d_gate_up = jax.lax.dynamic_update_index_in_dim(d_gate_up, d_gate_up[e] + dot32(xb.T, dh), e, 0)
      return (d_gate_up, d_down), dh @ gate_up[e].T
    return jax.lax.cond(b < layout.used_blocks, used, lambda d: (d, jnp.zeros_like(xb)), d_weights)
  blocks = jnp.arange(layout.block_expert.shape[0])
  zeros = (jnp.zeros_like(gate_up, jnp.float32), jnp.zeros_like(down, jnp.float32))  # float32 sums over blocks
  (d_gate_up, d_down), dx = jax.lax.scan(one, zeros, (_blocks(x, layout), h, _blocks(dy, layout),
                                                      layout.block_expert, blocks))
  return dx.reshape(x.shape), d_gate_up.astype(gate_up.dtype), d_down.astype(down.dtype), None


_blocked_experts.defvjp(_blocked_experts_fwd, _blocked_experts_bwd)
