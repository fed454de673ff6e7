"""Stacks of identical layers: built once with `nnx.vmap`, run with `nnx.scan` or a Python loop.

The parameters are always stored stacked (leading `layers` axis), so checkpoints do not depend on
`scan_layers`; the switch only changes how the stack is executed (one compiled body vs. unrolled), and both
paths run the same per-layer function, so they give identical numbers.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx


def build_stack(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """`make_layer(rngs)` vmapped `num_layers` times: every parameter gets a leading `layers` axis."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(r):
    return make_layer(r)

  return make(rngs)


def slice_stack(stack: nnx.Module, start: int, stop: int) -> nnx.Module:
  """Layers [start, stop) of a stack, as a stack (a view of the same parameter values)."""
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))


def run_stack(stack: nnx.Module, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry, xs=None, *,
              scan: bool = True):
  """(carry, y) = body(layer, carry, x) for each layer; returns (carry, ys stacked over layers)."""
  if scan:
    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def step(layer, c, x):
      return body(layer, c, x)

    return step(stack, carry, xs)
  graphdef, state = nnx.split(stack)
  num_layers = jax.tree.leaves(state)[0].shape[0]
  ys = []
  for i in range(num_layers):
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
    carry, y = body(layer, carry, jax.tree.map(lambda a: a[i], xs))
    ys.append(y)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
