"""Compile-only TPU / GPU targets for the tests: skipped, with the reason printed, where the stacks are absent."""
import functools

import pytest


@functools.lru_cache(maxsize=None)
def target_or_reason(name: str):
  """(Target, None), or (None, why it cannot be made here)."""
  from qwen3vl.tools import targets
  try:
    return targets.resolve(name), None
  except ValueError as e:
    return None, str(e)


def need(name: str):
  """The Target named `name`, or pytest.skip with the reason (e.g. libtpu / the CUDA plugin not installed)."""
  target, why = target_or_reason(name)
  if target is None:
    print(f"skipping {name}: {why}")
    pytest.skip(why)
  return target


def one_device_mesh(target):
  import jax
  import numpy as np
  return jax.sharding.Mesh(np.array(target.devices[:1]), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))
