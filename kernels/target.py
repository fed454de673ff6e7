"""Which chip a program is being built for: the devices of the mesh it is traced under, else the default backend.

Why not ``jax.default_backend()`` alone: a program compiled ahead of time for a TPU pod or a GPU node from a CPU
host (``python -m qwen3vl.tools.compile``) is traced in a process whose default backend is CPU; the mesh given to
``jax.set_mesh`` holds the target's (compile-only) devices, and the kernels must be chosen and lowered for those.
Every kernel gate asks this module, so what runs on a chip and what compiles for it are one code path.
"""
from __future__ import annotations

import jax

ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def _mesh_device():
  """The abstract device of the mesh set with ``jax.set_mesh`` (its platform), None without one."""
  mesh = jax.sharding.get_abstract_mesh()  # readable inside jit, unlike jax.sharding.get_mesh()
  if mesh.empty:
    return None
  return getattr(mesh, "abstract_device", None)


def target_platform() -> str:
  """"tpu", "gpu" or "cpu": the platform of the mesh's devices, else ``jax.default_backend()`` (CUDA/ROCm -> gpu)."""
  device = _mesh_device()
  name = device.platform if device is not None else jax.default_backend()
  return ALIASES.get(name, name)

