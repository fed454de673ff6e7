"""cuDNN flash attention through ``jax.nn.dot_product_attention(..., implementation="cudnn")``.

Why: on NVIDIA GPUs cuDNN's fused attention is the vendor baseline every hand-written kernel is measured against
(benchmarks/attention.py reports ratios to it), and for plain causal / windowed bf16 attention it is usually the
fastest rung of the ladder. It is a thin translation layer that declines (``NotImplementedError``, so the
dispatcher falls through) everything cuDNN cannot do exactly as ``kernels.attention`` specifies:

* platform: GPU only (``jax.default_backend() == "gpu"``).
* dtypes: float16 / bfloat16 only (cuDNN flash attention has no float32 path).
* head_dim: a multiple of 8, at most 128 (256 on Hopper and later; jax checks that itself and raises
  NotImplementedError, which passes through). 64, 72, 80 and 128 all qualify.
* segment ids: not supported. ``jax.nn.dot_product_attention`` has no segment-id argument (checked: jax 0.10.2,
  the jax 0.11.2 source, the current docs); its ``query_seq_lengths`` / ``key_value_seq_lengths`` express only
  one leading run per batch row, and a dense ``mask`` would be lowered as an O(Lq * Lk) bias, which defeats the
  point. Packed and per-image attention go to the Pallas / Triton kernels instead.
* sliding window: ``local_window_size=(w - 1, 0)`` with ``is_causal=True`` (cuDNN only supports a left window
  when causal; a non-causal window, which in this project leaves keys to the right unrestricted, is declined).
* causal with Lq != Lk: declined. Here the queries are the LAST Lq positions (decode with a KV cache); cuDNN's
  causal mask as exposed by jax is aligned at the top-left corner, which would be silently wrong.
* GQA: native (Hq a multiple of Hkv, same head grouping as ``kernels.attention``).
* block layouts and interpret mode: declined (no block-sparse or interpreter path).

Gradients come from jax's own cuDNN backward (``dot_product_attention`` is differentiable).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3vl.kernels import target

_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
MAX_HEAD_DIM = 128  # 256 on Hopper+, left to jax's own check (see _max_head_dim)


def _max_head_dim() -> int:
  try:
    cc = jax.devices()[0].compute_capability  # "9.0" on H100
    return 256 if tuple(int(x) for x in str(cc).split(".")) >= (9, 0) else MAX_HEAD_DIM
  except Exception:  # not a CUDA device, or an attribute older jax lacks
    return MAX_HEAD_DIM


def cudnn_attention(q, k, v, *, causal=False, segment_ids=None, sliding_window=None, scale=None, block_layout=None,
                    block_size=None, interpret=None):
  """Attention over [batch, length, heads, head_dim] via cuDNN; see the module docstring for what it declines."""
  del block_size
  if block_layout is not None:
    raise NotImplementedError("cudnn_attention has no block-sparse layout support")
  if interpret:
    raise NotImplementedError("cuDNN has no interpret mode")
  if target.target_platform() != "gpu":
    raise NotImplementedError(f"cudnn_attention needs a GPU target, not {target.target_platform()}")
  if segment_ids is not None:
    raise NotImplementedError("jax.nn.dot_product_attention(implementation='cudnn') takes no segment ids")
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
    raise NotImplementedError(f"cuDNN flash attention needs float16/bfloat16 q, k, v; got {sorted(map(str, dtypes))}")
  d = q.shape[-1]
  if d % 8 or d > _max_head_dim():
    raise NotImplementedError(f"cuDNN flash attention needs head_dim a multiple of 8 and <= {_max_head_dim()}, "
                              f"got {d}")
  return jax.nn.dot_product_attention(q, k, v, **translate(q.shape, k.shape, causal, sliding_window, scale),
                                      implementation="cudnn")


def translate(q_shape, k_shape, causal=False, sliding_window=None, scale=None) -> dict:
  """``kernels.attention`` mask arguments -> ``jax.nn.dot_product_attention`` keywords (NotImplementedError when
  not expressible). Separate so CPU tests can check the translation with ``implementation="xla"``."""
  lq, lk = q_shape[1], k_shape[1]
  if causal and lq != lk:
    raise NotImplementedError("cuDNN's causal mask is top-left aligned; Lq != Lk (queries last) is not expressible")
  window = None
  if sliding_window is not None:
    if not causal:
      raise NotImplementedError("cuDNN supports a sliding window only together with a causal mask")
    window = (int(sliding_window) - 1, 0)  # i - j < w  <=>  j >= i - (w - 1)
  return dict(scale=None if scale is None else float(scale), is_causal=bool(causal), local_window_size=window)
