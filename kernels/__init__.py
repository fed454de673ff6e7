"""Kernels behind one entry point per op; each picks the first implementation that supports the call.

Order of the attention ladder (kernels/dispatch.py): TPU Pallas; GPU Pallas (Triton lowering), jax-triton,
cuDNN; XLA (blockwise reference, the CPU default). Pallas kernels run in interpret mode when forced by name on a
platform that is not theirs (how CI tests them on CPU). Block-sparse attention shares the Pallas kernels.
"""
# This folder is `qwen3vl.kernels`. From the repository root it is also importable as the top-level `kernels`, a
# name Hugging Face's kernels package owns (transformers imports it when its metadata says it is installed). Under
# that name the folder stands aside: the next `kernels` on sys.path is loaded in its place (the import system
# returns what sys.modules holds after this file ran), or, with none, the folder stays empty (no version, nothing of
# JAX imported) and transformers looks past it.
if __name__ != "qwen3vl.kernels":
  import importlib.machinery as _machinery
  import importlib.util as _util
  import os as _os
  import sys as _sys

  _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
  _spec = _machinery.PathFinder.find_spec(
      __name__, [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root])
  if _spec is not None and _spec.loader is not None:
    _sys.modules[__name__] = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_sys.modules[__name__])
  del _machinery, _util, _os, _sys, _root, _spec
else:
  from qwen3vl.kernels.block_sparse import block_sparse_attention, dynamic_sparse_attention
  from qwen3vl.kernels.dispatch import attention, implementations, register_implementation
  from qwen3vl.kernels.layouts import (causal_layout, dynamic_topk_layout, layout_to_lists, segment_layout,
                                       sliding_window_layout)

  # Backend modules keep their own names (kernels.pallas_gpu_attention is the module); register their functions.
  from qwen3vl.kernels import cudnn_attention as _cudnn, pallas_gpu_attention as _pallas_gpu
  from qwen3vl.kernels import pallas_tpu_attention as _pallas_tpu, triton_attention as _triton
  from qwen3vl.kernels.xla_attention import xla_attention as _xla
  from qwen3vl.kernels.xla_block_sparse import xla_block_sparse_attention as _xla_block_sparse

  # Registered bottom-up: the XLA references first (the ladder's last rung), then the kernels in front of them.
  register_implementation("xla", _xla, before=None)
  register_implementation("xla", _xla_block_sparse, before=None, op="block_sparse_attention")
  for _op in ("attention", "block_sparse_attention"):
    register_implementation("pallas_tpu", _pallas_tpu.pallas_tpu_attention, op=_op, platform="tpu", per_device=True)
    register_implementation("pallas_gpu", _pallas_gpu.pallas_gpu_attention, op=_op, platform="gpu", per_device=True)
  register_implementation("triton", _triton.triton_attention, platform="gpu", per_device=True)
  # cuDNN's fused attention has partitioning rules of its own in XLA, so it stays auto-partitioned.
  register_implementation("cudnn", _cudnn.cudnn_attention, platform="gpu")

  __all__ = ["attention", "block_sparse_attention", "dynamic_sparse_attention", "causal_layout",
             "sliding_window_layout", "segment_layout", "dynamic_topk_layout", "layout_to_lists", "implementations",
             "register_implementation"]
