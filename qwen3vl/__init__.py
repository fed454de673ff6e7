"""Qwen3-VL (dense and MoE) in JAX / Flax NNX.

    import qwen3vl
    model = qwen3vl.hf.load_pretrained("path/to/Qwen3-VL-2B-Instruct")
    logits = model(input_ids, pixel_values=..., image_grid_thw=...)

The names below load on first use, so importing a light submodule (`qwen3vl.host_malloc`, which train.py and
infer.py call before anything else) does not pull in JAX and the model.
"""
import importlib

_LAZY = {"hf": "qwen3vl.hf", "ModelConfig": "qwen3vl.config", "TextConfig": "qwen3vl.config",
         "VisionConfig": "qwen3vl.config", "Qwen3VL": "qwen3vl.model.vlm", "count_params": "qwen3vl.model.vlm",
         "init_model": "qwen3vl.model.vlm"}

__all__ = list(_LAZY)


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module 'qwen3vl' has no attribute {name!r}")
  module = importlib.import_module(_LAZY[name])
  return module if name == "hf" else getattr(module, name)
