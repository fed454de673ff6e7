"""Device mesh and sharding rules: logical axis names (in the model) -> mesh axes `data`, `fsdp`, `tensor`, `expert`.

The model tags every parameter with logical names (`embed`, `mlp`, `heads`, `experts`, ...; see
`model/layers.py`) and names no mesh axis. One rules table turns names into mesh axes, so data parallel, FSDP,
tensor and expert parallel are the same code with different `config.mesh` sizes: FSDP shards the `embed` dimension
of every weight, tensor parallelism the heads / MLP / vocabulary dimension, expert parallelism the experts, and the
batch goes over every axis that is not tensor (the expert axis doubles as a data and FSDP axis for the non-expert
layers: without that, a pod's expert=64 would hold every attention weight and its optimizer state whole).
A dimension a mesh axis does not divide stays whole (a tiny config on 8 devices still runs), and the sharding
that results is what `describe` prints and the golden table in tests pins.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "expert", "tensor")
BATCH = ("data", "fsdp", "expert")  # mesh axes the batch (and the vision tower's patches) is split over

# logical name -> mesh axis (or axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH),
    ("layers", None),
    # The expert axis shards the model width too (FSDP over fsdp x expert): expert weights take `expert` on their
    # experts dimension first, so this reaches only the rest, which would otherwise be whole on every expert shard.
    ("embed", ("fsdp", "expert")),
    ("out_embed", ("fsdp", "expert")),
    ("patch", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("experts", "expert"),
    # Activations: split over the batch axes, heads / MLP / vocabulary over tensor, the model width whole (so
    # FSDP gathers weights, never activations).
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Sizes of (data, fsdp, expert, tensor) from config.mesh; at most one -1, which takes the remaining devices."""
  sizes = {a: int(mesh_config.get(a, 1)) for a in AXES}
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
    raise ValueError(f"config.mesh {sizes}: sizes must be >= 1, with at most one -1 (= the remaining devices)")
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"config.mesh {sizes}: {num_devices} devices are not a multiple of {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"config.mesh {sizes} needs {math.prod(sizes.values())} devices, {num_devices} are here")
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, expert, tensor) mesh over `devices` (default: all), laid out by `jax.make_mesh` so the
  innermost axes (tensor, then expert) land on the fastest links."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  # Auto axes: the compiler propagates shardings from the parameters and batch (no per-op annotations needed).
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  try:
    return jax.make_mesh(shape, AXES, devices=devices, axis_types=auto)
  except NotImplementedError:  # an axis that no product of the TPU torus's sides makes (8 on 4x4x4): split one
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, AXES, axis_types=auto)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
  """PartitionSpec for an array of `shape` whose dimensions have logical `names`. Each mesh axis is used once
  (first dimension wins) and only where it divides the dimension; size-1 mesh axes are dropped."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]  # keep the longest prefix that divides
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """Pins an activation's sharding by logical names, under the mesh of the enclosing `jax.set_mesh` (the train
  step sets it). Without one (a single device, generation, tests) it is a no-op, so the model code runs
  unchanged everywhere; the constraints keep the partitioner from gathering a global batch anywhere."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def param_specs(state: nnx.State, mesh, rules=DEFAULT_RULES) -> dict:
  """PartitionSpecs of a model's parameters (a pure dict shaped like `nnx.to_pure_dict(state)`); `mesh` may be
  a `jax.sharding.AbstractMesh` (only its axis sizes are read)."""
  names = nnx.to_pure_dict(nnx.get_partition_spec(state))
  shapes = nnx.to_pure_dict(state)
  return jax.tree.map(lambda spec, x: logical_to_spec(tuple(spec), np.shape(x), mesh, rules), names, shapes,
                      is_leaf=lambda x: isinstance(x, P))


def param_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
  """NamedShardings of a model's parameters on `mesh` (see param_specs)."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(state, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
  """Sharding of a batch array: dimension `batch_dim` over the batch axes that are larger than 1."""
  axes = tuple(a for a in BATCH if mesh.shape[a] > 1)
  spec = [None] * ndim
  if axes:
    spec[batch_dim] = axes
  return NamedSharding(mesh, P(*spec))


def describe(specs: dict) -> list[str]:
  """'path: PartitionSpec' lines of a param_specs tree, sorted (for logs and the golden table in tests)."""
  flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  return sorted(f"{'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)}: {s}" for path, s in flat)


def batch_shardings(shapes: Mapping[str, Sequence[int]], mesh: Mesh) -> dict:
  """Shardings of a training batch's arrays, by key and shape: each split over the batch axes along its batch
  dimension (dimension 1 of `positions` [3, B, L], 0 elsewhere, the vision tower's packed patch rows included),
  or replicated where the batch axes do not divide that dimension."""
  n = math.prod(mesh.shape[a] for a in BATCH)
  out = {}
  for key, shape in shapes.items():
    dim = 1 if key == "positions" else 0
    split = len(shape) > dim and shape[dim] % n == 0
    out[key] = batch_sharding(mesh, len(shape), dim) if split else replicated(mesh)
  return out


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """A training batch placed on the mesh (see batch_shardings)."""
  shardings = batch_shardings({k: np.shape(x) for k, x in batch.items()}, mesh)
  return {k: jax.device_put(x, shardings[k]) for k, x in batch.items()}


def place(tree, shardings) -> Any:
  """Host values (the same on every process) -> global arrays with `shardings`; each process builds only its
  own shards (`jax.make_array_from_callback`), which also works where a sharding spans several hosts."""
  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(one, tree, shardings)


def bytes_per_device(tree) -> tuple[int, int]:
  """(bytes a device holds, bytes of the whole tree) for a tree of placed arrays."""
  leaves = jax.tree.leaves(tree)
  local = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  return local, sum(x.nbytes for x in leaves)


def follow_params(tree, params, mesh: Mesh) -> Any:
  """Shardings for a tree that holds copies of the placed `params` (optimizer moments, ...): a leaf whose key path
  ends with a parameter's path and has its shape gets that parameter's sharding; anything else (step counts,
  factored statistics) is replicated. `tree` may hold arrays or ShapeDtypeStructs."""
  by_path = {tuple(path): p for path, p in jax.tree_util.tree_leaves_with_path(params)}

  def pick(path, leaf):
    for start in range(len(path)):
      p = by_path.get(tuple(path[start:]))
      if p is not None and p.shape == np.shape(leaf):
        return p.sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (scalars, step counters, metrics)."""
  return NamedSharding(mesh, P())
