"""Qwen3-VL (dense and MoE) in JAX / Flax NNX.

    import qwen3vl
    model = qwen3vl.hf.load_pretrained("path/to/Qwen3-VL-2B-Instruct")
    logits = model(input_ids, pixel_values=..., image_grid_thw=...)

The names below load on first use, so importing a light submodule (`qwen3vl.host_malloc`, which train.py and
infer.py call before anything else) does not pull in JAX and the model.
"""
import importlib
import os

# The repository's top-level kernels/ and configs/ folders are this package's `qwen3vl.kernels` and
# `qwen3vl.configs`: pyproject.toml installs them there, so an installed qwen3vl owns no top-level name but its own
# (`kernels` is Hugging Face's package, which transformers imports when it finds one). Run from a source checkout,
# the folders are found by adding the repository root to this package's search path; qwen3vl/'s own modules come
# first, so nothing of ours is shadowed.
if not os.path.isdir(os.path.join(__path__[0], "kernels")):
  __path__.append(os.path.dirname(__path__[0]))

_LAZY = {"hf": "qwen3vl.hf", "ModelConfig": "qwen3vl.config", "TextConfig": "qwen3vl.config",
         "VisionConfig": "qwen3vl.config", "Qwen3VL": "qwen3vl.model.vlm", "count_params": "qwen3vl.model.vlm",
         "init_model": "qwen3vl.model.vlm"}

__all__ = list(_LAZY)


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module 'qwen3vl' has no attribute {name!r}")
  module = importlib.import_module(_LAZY[name])
  return module if name == "hf" else getattr(module, name)
