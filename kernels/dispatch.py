"""The project's single attention entry point and its fallback ladder.

Why one entry point: every caller (text layers, vision blocks, decode with a KV cache) states *what* it wants
(causal, segments, window) and never *how*. The dispatcher walks an ordered registry of implementations, fastest
first; an implementation that cannot handle the platform or the arguments raises ``NotImplementedError`` and the
next one is tried. The XLA implementation is last and handles everything, so the ladder always ends somewhere.
Kernel modules add themselves in front of it with ``register_implementation``.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional

import jax.numpy as jnp

from kernels.xla_attention import xla_attention

logger = logging.getLogger(__name__)

# name -> fn(q, k, v, *, causal, segment_ids, sliding_window, scale); tried in insertion order.
_REGISTRY: Dict[str, Callable] = {"xla": xla_attention}
_LOGGED = set()


def register_implementation(name: str, fn: Callable, *, before: Optional[str] = "xla") -> None:
  """Add (or replace) an implementation, placed before ``before`` (default: ahead of the XLA reference).

  ``before=None`` appends at the end. ``fn`` takes the normalised arguments of ``attention`` (``segment_ids`` is
  None or a (q_ids, kv_ids) pair) and raises ``NotImplementedError`` to pass to the next implementation.
  """
  items = [(n, f) for n, f in _REGISTRY.items() if n != name]
  names = [n for n, _ in items]
  at = names.index(before) if before in names else len(items)
  items.insert(at, (name, fn))
  _REGISTRY.clear()
  _REGISTRY.update(items)


def implementations() -> tuple:
  """Registered implementation names, in the order the dispatcher tries them."""
  return tuple(_REGISTRY)


def attention(q, k, v, *, causal=False, segment_ids=None, sliding_window=None, scale=None, implementation=None):
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

  Returns [batch, Lq, Hq, head_dim] in q.dtype; softmax runs in float32; a query with no visible key gives 0.
  """
  segment_ids = _check(q, k, v, segment_ids, sliding_window)
  if implementation is not None and implementation not in _REGISTRY:
    raise ValueError(f"unknown attention implementation {implementation!r}; valid: {', '.join(_REGISTRY)}")
  names = [implementation] if implementation is not None else list(_REGISTRY)
  reasons = []
  for name in names:
    try:
      out = _REGISTRY[name](q, k, v, causal=causal, segment_ids=segment_ids, sliding_window=sliding_window,
                            scale=scale)
    except NotImplementedError as e:
      if implementation is not None:
        raise
      logger.debug("attention implementation %s declined: %s", name, e)
      reasons.append(f"{name}: {e}")
      continue
    key = (q.shape, k.shape, str(q.dtype), name)
    if key not in _LOGGED:
      _LOGGED.add(key)
      logger.info("attention: using %s for q%s k%s %s", name, tuple(q.shape), tuple(k.shape), q.dtype)
    return out
  raise NotImplementedError("no attention implementation accepted these arguments: " + "; ".join(reasons))


def _check(q, k, v, segment_ids, sliding_window):
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
