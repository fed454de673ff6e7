"""Custom kernels on a device mesh: each call runs inside a ``shard_map``, so every chip computes its own share.

XLA cannot partition a custom kernel: Mosaic refuses ("cannot be automatically partitioned"), and a Triton call is
replicated, every GPU then running it on the whole global batch. So under a mesh (``jax.set_mesh``, as the train
step and ``generate(mesh=...)`` trace) the dispatcher hands kernel calls to ``per_device``, which splits

* the batch over every mesh axis that is not ``tensor`` (data, fsdp, expert, ...), the longest prefix of them whose
  sizes divide it, and the heads over ``tensor`` when it divides both the query and the kv heads (contiguous head
  blocks keep the GQA grouping: local query head h still reads local kv head h // group);
* with ``sequence_sharded=True`` (one packed sequence, e.g. the vision tower's patches, whose rows the batch axes
  split), the query rows instead of the batch: each chip attends its own rows to the whole sequence's keys and
  values (gathered: an image may straddle two chips' blocks; segment ids keep attention within images and the
  kernels skip the blocks of other images, so the compute stays each chip's share). Positional masks (causal,
  window) would shift with the split and are refused.

Axes already manual (a call inside another ``shard_map``) are left alone. A mesh axis that divides nothing is not
used, and the kernel then runs replicated over it, which is still correct. Block layouts follow their axes: a
per-head layout's heads over ``tensor``, a layout's query-block rows over the split query rows.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

HEAD_AXES = ("tensor",)  # mesh axes that split heads; every other axis splits the batch (or the query rows)


def _free_axes(mesh) -> list[str]:
  """Mesh axes of size > 1 that are not manual already."""
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  return [a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in manual]


def _dividing_prefix(axes, mesh, size: int, multiple_of: int = 1) -> tuple:
  """The longest prefix of ``axes`` whose product divides ``size`` into parts that are multiples of ``multiple_of``."""
  axes = tuple(axes)
  while axes and (size % math.prod(mesh.shape[a] for a in axes)
                  or (size // math.prod(mesh.shape[a] for a in axes)) % multiple_of):
    axes = axes[:-1]
  return axes


def _axis(axes: tuple):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def plan(mesh, q_shape, k_shape, *, sequence_sharded: bool = False, block_size: Optional[int] = None):
  """(row axes, head axes): the mesh axes that split q's batch (or its rows when ``sequence_sharded``) and heads."""
  (b, lq, hq, _), hkv = q_shape, k_shape[2]
  free = _free_axes(mesh)
  heads = tuple(a for a in HEAD_AXES if a in free)
  heads = heads if heads and hq % math.prod(mesh.shape[a] for a in heads) == 0 and \
      hkv % math.prod(mesh.shape[a] for a in heads) == 0 else ()
  others = [a for a in free if a not in HEAD_AXES]
  if sequence_sharded:  # a layout's query blocks must not straddle two chips' rows
    rows = _dividing_prefix(others, mesh, lq, block_size or 1)
  else:
    rows = _dividing_prefix(others, mesh, b)
  return rows, heads


def per_device(fn: Callable, q, k, v, *, sequence_sharded: bool = False, segment_ids=None, block_layout=None,
               block_size: Optional[int] = None, causal: bool = False, sliding_window=None, **kwargs):
  """``fn(q, k, v, segment_ids=..., block_layout=..., ...)`` run per device under the current mesh (see the
  module docstring); without a mesh of more than one device, or with every axis manual, just ``fn(...)``."""
  mesh = jax.sharding.get_abstract_mesh()
  layout_kw = {} if block_layout is None else {"block_layout": block_layout, "block_size": block_size}
  call = lambda q, k, v, segment_ids, **lay: fn(q, k, v, segment_ids=segment_ids, causal=causal,  # noqa: E731
                                                sliding_window=sliding_window, **lay, **kwargs)
  if mesh.empty or not _free_axes(mesh):
    return call(q, k, v, segment_ids, **layout_kw)
  if sequence_sharded and (causal or sliding_window is not None):
    raise ValueError("sequence_sharded attention takes no causal or sliding_window mask (positions would shift)")
  rows, heads = plan(mesh, q.shape, k.shape, sequence_sharded=sequence_sharded,
                     block_size=block_size if block_layout is not None else None)
  r, h = _axis(rows), _axis(heads)
  if sequence_sharded:
    q_spec, kv_spec, q_ids_spec, kv_ids_spec = P(None, r, h), P(None, None, h), P(None, r), P()
  else:
    q_spec, kv_spec, q_ids_spec, kv_ids_spec = P(r, None, h), P(r, None, h), P(r), P(r)

  args, specs = [q, k, v], [q_spec, kv_spec, kv_spec]
  if segment_ids is not None:
    args.append(tuple(segment_ids))
    specs.append((q_ids_spec, kv_ids_spec))
  static_layout = None
  if block_layout is not None:
    layout_rows = r if sequence_sharded else None
    layout_spec = P(h, layout_rows) if np.ndim(block_layout) == 3 else P(layout_rows)
    if all(a is None for a in layout_spec) and isinstance(block_layout, np.ndarray):
      static_layout = block_layout  # unsplit and concrete: stays compile-time metadata for the kernels
    else:
      args.append(jax.numpy.asarray(block_layout))
      specs.append(layout_spec)

  def local(*xs):
    q, k, v, *rest = xs
    segs = tuple(rest.pop(0)) if segment_ids is not None else None
    lay = {}
    if block_layout is not None:
      lay = {"block_layout": static_layout if static_layout is not None else rest.pop(0), "block_size": block_size}
    return call(q, k, v, segs, **lay)

  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec, check_vma=False)(*args)
