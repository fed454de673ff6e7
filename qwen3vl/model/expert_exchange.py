"""Expert-parallel token exchange: each device sends every token copy once, to the device that holds its expert,
and gets the results back the same way (the all-to-all dispatch of MaxText and GShard; dropless, or with a
capacity).

`plan` is the index arithmetic, shared by both transports: the device's copies sorted by destination shard (a
ragged array: `input_offsets`, `send_sizes`), and, from every device's send sizes (an all_gather of n integers),
where each chunk lands on its receiver (`output_offsets`) and what each device receives (`recv_offsets`,
`recv_sizes`). A receiver holds what it got contiguously by source, in a buffer of `capacity` rows (static):
dropless, capacity is the most the group can send one device (MoE.receive_capacity); smaller, each receiver keeps
the first `capacity` rows in source order (lower source shards first, each chunk's copies in token order), senders
send only what will be kept, and dropped copies come back as zeros (`Plan.dropped` counts them).

Transports: "ragged" is `jax.lax.ragged_all_to_all` (XLA:TPU and XLA:GPU; XLA:CPU does not implement it);
"dense" moves the same chunks padded to the largest possible chunk with a dense `all_to_all` and lays them out as
the ragged one does, so the CPU tests check the arithmetic the accelerators use. The dense transport's buffers
are n x min(local copies, capacity) (as large as gathering them); only the ragged one saves memory.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Plan(NamedTuple):
  order: jax.Array           # [C] the copy at each sorted position (sorted by destination shard)
  input_offsets: jax.Array   # [n] where the chunk for shard j starts in the sorted copies
  send_sizes: jax.Array      # [n] copies sent to shard j
  output_offsets: jax.Array  # [n] where the chunk sent to shard j starts in j's receive buffer
  recv_offsets: jax.Array    # [n] where the chunk from shard i starts in this device's receive buffer
  recv_sizes: jax.Array      # [n] copies received from shard i
  return_offsets: jax.Array  # [n] where the results for shard i's chunk go back in i's sorted copies
  dropped: jax.Array         # [] this device's copies that found no room at their receiver


def plan(dest: jax.Array, n: int, axis_name: str, capacity: int) -> Plan:
  """dest [C]: the shard (0..n-1) of each of this device's copies, n for a copy not to send (padding; sorted
  last, in no chunk); inside a shard_map over `axis_name`. Each receiver keeps at most `capacity` rows."""
  sizes = jnp.bincount(dest, length=n).astype(jnp.int32)
  order = jnp.argsort(dest, stable=True).astype(jnp.int32)
  offsets = (jnp.cumsum(sizes) - sizes).astype(jnp.int32)
  every = jax.lax.all_gather(sizes, axis_name)  # [source, destination]
  total = jnp.cumsum(every, axis=0)              # rows sources 0..i send to each destination
  starts = jnp.minimum(total - every, capacity)  # where source i's chunk starts at each receiver
  kept = jnp.minimum(total, capacity) - starts   # [source, destination] rows that fit
  me = jax.lax.axis_index(axis_name)
  return Plan(order, offsets, kept[me], starts[me], starts[:, me], kept[:, me],
              jax.lax.all_gather(offsets, axis_name)[:, me], (sizes - kept[me]).sum())


def send(rows: jax.Array, p: Plan, capacity: int, axis_name: str, transport: str) -> jax.Array:
  """rows [C, ...] in sorted order -> [capacity, ...]: what this device receives, by source (zeros after)."""
  out = jnp.zeros((capacity,) + rows.shape[1:], rows.dtype)
  if transport == "ragged":
    return jax.lax.ragged_all_to_all(rows, out, p.input_offsets, p.send_sizes, p.output_offsets, p.recv_sizes,
                                     axis_name=axis_name)
  width = min(rows.shape[0], capacity)  # the largest chunk that can be kept
  chunks = jax.lax.all_to_all(_pack(rows, p.input_offsets, p.send_sizes, width), axis_name, 0, 0)
  return _unpack(chunks, p.recv_offsets, p.recv_sizes, capacity)


def receive(results: jax.Array, p: Plan, copies: int, axis_name: str, transport: str) -> jax.Array:
  """The way back: results [capacity, ...] laid out as `send` returned -> [C, ...] in this device's sorted order."""
  out = jnp.zeros((copies,) + results.shape[1:], results.dtype)
  if transport == "ragged":
    return jax.lax.ragged_all_to_all(results, out, p.recv_offsets, p.recv_sizes, p.return_offsets, p.send_sizes,
                                     axis_name=axis_name)
  width = min(results.shape[0], copies)
  chunks = jax.lax.all_to_all(_pack(results, p.recv_offsets, p.recv_sizes, width), axis_name, 0, 0)
  return _unpack(chunks, p.input_offsets, p.send_sizes, copies)


def _pack(rows, offsets, sizes, width):
  """[n, width, ...]: chunk j (rows offsets[j] .. + sizes[j]) at [j, :sizes[j]], zeros after."""
  r = jnp.arange(width)
  index = offsets[:, None] + r[None, :]
  valid = r[None, :] < sizes[:, None]
  return jnp.take(rows, jnp.where(valid, index, rows.shape[0]), axis=0, mode="fill", fill_value=0)


def _unpack(chunks, offsets, sizes, length):
  """chunks [n, width, ...] -> [length, ...]: chunk i's first sizes[i] rows at offsets[i] (increasing offsets, the
  chunks apart: gaps where a sender's copies were dropped); zeros elsewhere."""
  n, width = chunks.shape[:2]
  row = jnp.arange(length)
  found = jnp.searchsorted(offsets + sizes, row, side="right")  # the first chunk ending after the row
  source = jnp.minimum(found, n - 1)
  r = row - offsets[source]
  valid = (found < n) & (r >= 0)
  flat = chunks.reshape((n * width,) + chunks.shape[2:])
  return jnp.take(flat, jnp.where(valid, source * width + r, n * width), axis=0, mode="fill", fill_value=0)
