"""Stacks of identical layers: built once with `nnx.vmap`, run with `nnx.scan` or a Python loop.

The parameters are always stored stacked (leading `layers` axis), so checkpoints do not depend on
`scan_layers`; the switch only changes how the stack is executed (one compiled body vs. unrolled), and both
paths run the same per-layer function, so they give identical numbers. Rematerialization wraps that
per-layer function in `jax.checkpoint` (see remat.py), so a policy decides per layer what the backward keeps.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3vl.model import remat as remat_lib


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


def index_stack(stack: nnx.Module, i) -> nnx.Module:
  """Layer i of a stack, as a single layer (a view of the same parameter values)."""
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def block_stack(stack: nnx.Module, size: int) -> nnx.Module:
  """A stack of n layers viewed as n / size blocks of `size` consecutive layers (leading axes [n/size, size]),
  so a scan can run a block per step."""
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a.reshape((-1, size) + a.shape[1:]), state))


def run_stack(stack: nnx.Module, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry, xs=None, *,
              scan: bool = True, remat: str = "none", remat_custom: str = ""):
  """(carry, y) = body(layer, carry, x) for each layer; returns (carry, ys stacked over layers). `stack` may be a
  tuple of stacks with the same leading size (body then gets a tuple). `remat` is a preset of remat.py applied
  to each step."""
  policy = remat_lib.policy(remat, remat_custom)
  if remat != "none":  # inside a scan the loop already keeps XLA from merging forward and recomputation
    body = nnx.remat(body, policy=policy, prevent_cse=not scan)
  if scan:
    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def step(layer, c, x):
      return body(layer, c, x)

    return step(stack, carry, xs)
  num_layers = jax.tree.leaves(nnx.state(stack))[0].shape[0]
  ys = []
  for i in range(num_layers):
    carry, y = body(index_stack(stack, i), carry, jax.tree.map(lambda a: a[i], xs))
    ys.append(y)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
