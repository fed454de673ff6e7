"""Qwen3-VL (dense and MoE) in JAX / Flax NNX.

    import qwen3vl
    model = qwen3vl.hf.load_pretrained("path/to/Qwen3-VL-2B-Instruct")
    logits = model(input_ids, pixel_values=..., image_grid_thw=...)
"""
from qwen3vl import hf
from qwen3vl.config import ModelConfig, TextConfig, VisionConfig
from qwen3vl.model.vlm import Qwen3VL, count_params, init_model

__all__ = ["hf", "ModelConfig", "TextConfig", "VisionConfig", "Qwen3VL", "count_params", "init_model"]
