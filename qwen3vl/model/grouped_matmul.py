"""A grouped matmul for backends without a native one (`ModelConfig.moe_impl="blocked"`, the CPU default).

Same contract as `jax.lax.ragged_dot(lhs [M, K], rhs [G, K, N], group_sizes [G])`: rows are sorted by group, row
block g uses rhs[g]; rows past sum(group_sizes) come out as zeros. XLA:CPU lowers ragged_dot to every group
over every row (G x the work); here each group's rows are padded to whole blocks of `block` rows, every block
gathers its group's matrix and one batched matmul does the rest: about (1 + G * block / M) x the routed work,
plain dots forward and backward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def blocked_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, block: int = 128) -> jax.Array:
  m, g = lhs.shape[0], rhs.shape[0]
  block = max(8, min(block, m))
  sizes = group_sizes.astype(jnp.int32)
  padded = (sizes + block - 1) // block * block
  end, padded_end = jnp.cumsum(sizes), jnp.cumsum(padded)
  num_blocks = (m + g * (block - 1)) // block  # static bound: sum(ceil(s / block)) <= (sum(s) + g(block - 1)) / block
  row = jnp.arange(m)
  group = jnp.clip(jnp.searchsorted(end, row, side="right"), 0, g - 1)
  valid = row < end[-1]
  # Row r of group e goes to its group's padded start plus its offset within the group; invalid rows are dropped.
  slot = jnp.where(valid, (padded_end - padded)[group] + row - (end - sizes)[group], num_blocks * block)
  x = jnp.zeros((num_blocks * block, lhs.shape[1]), lhs.dtype).at[slot].set(lhs, mode="drop")
  block_group = jnp.clip(jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right"), 0, g - 1)
  y = jnp.einsum("bmk,bkn->bmn", x.reshape(num_blocks, block, -1), rhs[block_group])
  y = y.reshape(num_blocks * block, -1)
  return jnp.where(valid[:, None], y[jnp.minimum(slot, num_blocks * block - 1)], 0).astype(lhs.dtype)
