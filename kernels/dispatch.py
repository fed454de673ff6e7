"""The project's kernel entry points and their fallback ladders: one registry per op.

Why one entry point per op: every caller (text layers, vision blocks, decode with a KV cache) states *what* it wants
(causal, segments, window, a block layout) and never *how*. For each op ("attention", "block_sparse_attention") the
dispatcher walks an ordered registry of implementations, fastest first; an implementation that cannot handle the
platform or the arguments raises ``NotImplementedError`` and the next one is tried. The XLA implementation is last
and handles everything, so the ladder always ends somewhere. Kernel modules add themselves in front of it with
``register_implementation(name, fn, op=..., platform=...)``.

Each entry records the platform it is native to: ``None`` for portable code (XLA; called without ``interpret``), or
"gpu" / "tpu" for Pallas kernels, which take ``interpret``:

* automatic dispatch passes ``interpret=None``: the kernel runs compiled on its own platform and raises
  ``NotImplementedError`` elsewhere, so the ladder moves on;
* forcing a name (``implementation="pallas_tpu"``) on CPU passes ``interpret=True``: the Pallas interpreter runs
  the same kernel, which is how CPU CI tests it; on its own platform it passes ``interpret=None``; forcing a TPU
  kernel into a GPU program (or the reverse) is a ValueError.

"Platform" is the compile target (``kernels.target``: the devices of the ``jax.set_mesh`` mesh), not the host, so a
TPU or GPU program built on a CPU machine gets the kernels it would get on the chips. Entries registered with
``per_device=True`` (the custom kernels XLA cannot partition) run under ``kernels.partition.per_device``: inside a
``shard_map`` over the mesh, each chip on its own share of the batch and heads.

Imports run one way: this module and ``kernels.layouts`` sit below the implementations, which ``kernels/__init__``
registers (the XLA references first, so they end the ladder).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Dict, NamedTuple, Optional

import jax.numpy as jnp

from qwen3vl.kernels import partition, target

logger = logging.getLogger(__name__)


class Implementation(NamedTuple):
  """A registry entry: ``fn``, the platform it is native to (None: portable, never given ``interpret``), and
  whether it must run per device under a mesh (a custom kernel the compiler cannot partition)."""
  fn: Callable
  platform: Optional[str] = None
  per_device: bool = False


# op -> {name -> Implementation}, each tried in insertion order. Ops and the keywords their implementations take:
#   attention:              causal, segment_ids, sliding_window, scale
#   block_sparse_attention: causal, segment_ids, sliding_window, scale, block_layout, block_size
# (+ interpret for entries with a platform). segment_ids is always None or a (q_ids, kv_ids) pair.
_REGISTRIES: Dict[str, Dict[str, Implementation]] = {"attention": {}, "block_sparse_attention": {}}
_LOGGED = set()
_RECORDERS: list = []  # open `recording()` lists


@contextlib.contextmanager
def recording():
  """Collects (op, implementation, q shape, k shape, dtype) of every call dispatched (traced) inside the block:
  what the compile tool reports as "which kernel each call got"."""
  calls: list = []
  _RECORDERS.append(calls)
  try:
    yield calls
  finally:
    _RECORDERS.remove(calls)


def _registry(op: str) -> Dict[str, Implementation]:
  if op not in _REGISTRIES:
    raise ValueError(f"unknown op {op!r}; valid: {', '.join(_REGISTRIES)}")
  return _REGISTRIES[op]


def register_implementation(name: str, fn: Callable, *, before: Optional[str] = "xla", op: str = "attention",
                            platform: Optional[str] = None, per_device: bool = False) -> None:
  """Add (or replace) an implementation of ``op``, placed before ``before`` (default: ahead of the XLA reference).

  ``before=None`` appends at the end. ``fn`` takes the normalised arguments of the op (``segment_ids`` is None or a
  (q_ids, kv_ids) pair) and raises ``NotImplementedError`` to pass to the next implementation. ``platform``
  ("gpu", "tpu") marks a Pallas kernel native to that platform: it is then also called with ``interpret`` (see the
  module docstring). ``per_device=True`` runs it inside a ``shard_map`` under a mesh (``kernels.partition``).
  The same function may be registered under several ops.
  """
  registry = _registry(op)
  if platform is not None:
    platform = target.ALIASES.get(platform, platform)
  items = [(n, e) for n, e in registry.items() if n != name]
  names = [n for n, _ in items]
  at = names.index(before) if before in names else len(items)
  items.insert(at, (name, Implementation(fn, platform, per_device)))
  registry.clear()
  registry.update(items)


def implementations(op: str = "attention") -> tuple:
  """Registered implementation names of ``op``, in the order the dispatcher tries them."""
  return tuple(_registry(op))


current_platform = target.target_platform  # the pre-target name


def dispatch_op(op: str, implementation: Optional[str], q, k, v, *, sequence_sharded: bool = False, **kwargs):
  """Runs the ladder of ``op`` on already validated arguments; ``implementation`` forces one name (not caught)."""
  registry = _registry(op)
  if implementation is not None and implementation not in registry:
    raise ValueError(f"unknown {op} implementation {implementation!r}; valid: {', '.join(registry)}")
  names = [implementation] if implementation is not None else list(registry)
  reasons = []
  for name in names:
    entry = registry[name]
    call_kwargs = dict(kwargs)
    if entry.platform is not None:
      here = target.target_platform()
      forced_elsewhere = implementation is not None and entry.platform != here
      if forced_elsewhere and here != "cpu":  # the interpreter is for testing on CPU, not inside a chip's program
        raise ValueError(f"{op} implementation {name!r} is a {entry.platform} kernel; this program is built for "
                         f"{here}")
      call_kwargs["interpret"] = True if forced_elsewhere else None
    try:
      if entry.per_device:
        out = partition.per_device(entry.fn, q, k, v, sequence_sharded=sequence_sharded, **call_kwargs)
      else:
        out = entry.fn(q, k, v, **call_kwargs)
    except NotImplementedError as e:
      if implementation is not None:
        raise
      logger.debug("%s implementation %s declined: %s", op, name, e)
      reasons.append(f"{name}: {e}")
      continue
    key = (op, q.shape, k.shape, str(q.dtype), name)
    for calls in _RECORDERS:
      calls.append((op, name, tuple(q.shape), tuple(k.shape), str(q.dtype)))
    if key not in _LOGGED:
      _LOGGED.add(key)
      logger.info("%s: using %s for q%s k%s %s", op, name, tuple(q.shape), tuple(k.shape), q.dtype)
    return out
  raise NotImplementedError(f"no {op} implementation accepted these arguments: " + "; ".join(reasons))


def attention(q, k, v, *, causal=False, segment_ids=None, sliding_window=None, scale=None, implementation=None,
              sequence_sharded=False):
  """Multi-head attention with GQA, causal / sliding-window / segment masks.

  Args:
    q: [batch, Lq, Hq, head_dim]. k, v: [batch, Lk, Hkv, head_dim]; Hkv divides Hq and query head h uses kv head
      h // (Hq // Hkv) (HF ``repeat_kv`` grouping).
    causal: mask future keys. When Lq != Lk the queries are the LAST Lq positions (query i is at Lk - Lq + i),
      which is what decode with a KV cache needs.
    segment_ids: None, an int array [batch, L] (needs Lq == Lk), or a pair (q_ids [batch, Lq], kv_ids
      [batch, Lk]). A query sees only keys with an equal id (packed samples, per-image vision attention; give
      padding id 0 so padding rows attend among themselves).
    sliding_window: None or int w > 0: query at position i sees key j only if i - j < w (on top of ``causal``).
    scale: score scale, default head_dim ** -0.5.
    implementation: None for the first that works, or a registered name to force one (errors are not caught).
    sequence_sharded: under a mesh, q's rows (not its batch) are split over the batch axes: one packed sequence
      such as the vision tower's patches (``kernels.partition``). No effect without a mesh or on XLA.

  Returns [batch, Lq, Hq, head_dim] in q.dtype; softmax runs in float32; a query with no visible key gives 0.
  """
  segment_ids = check_args(q, k, v, segment_ids, sliding_window)
  return dispatch_op("attention", implementation, q, k, v, causal=causal, segment_ids=segment_ids,
                     sliding_window=sliding_window, scale=scale, sequence_sharded=sequence_sharded)


def check_args(q, k, v, segment_ids, sliding_window):
  """Validates shapes with messages that name the argument; returns segment_ids as None or a (q, kv) pair."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects [batch, length, heads, head_dim]; got q{q.shape} k{k.shape} v{v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: k{k.shape} v{v.shape}")
  (b, lq, hq, d), (bk, lk, hkv, dk) = q.shape, k.shape
  if b != bk or d != dk:
    raise ValueError(f"q{q.shape} and k{k.shape} must agree on batch and head_dim")
  if hq % hkv:
    raise ValueError(f"kv heads ({hkv}) must divide query heads ({hq})")
  if sliding_window is not None and int(sliding_window) <= 0:
    raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
  if segment_ids is None:
    return None
  if not isinstance(segment_ids, (tuple, list)):
    if lq != lk:
      raise ValueError(f"a single segment_ids array needs Lq == Lk (got {lq}, {lk}); pass (q_ids, kv_ids)")
    segment_ids = (segment_ids, segment_ids)
  q_ids, kv_ids = (jnp.asarray(s) for s in segment_ids)
  if q_ids.shape != (b, lq) or kv_ids.shape != (b, lk):
    raise ValueError(f"segment_ids shapes {q_ids.shape}, {kv_ids.shape} must be ({b}, {lq}) and ({b}, {lk})")
  return q_ids, kv_ids


_check = check_args  # the pre-refactor name
