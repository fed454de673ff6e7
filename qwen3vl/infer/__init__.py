"""Inference: `generate` (prefill + compiled decode loop over a KV cache) and its sampling rules."""
from qwen3vl.infer.generate import generate
from qwen3vl.infer.sampling import Sampling

__all__ = ["generate", "Sampling"]
