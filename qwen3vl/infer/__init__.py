"""Inference: `generate` (prefill + compiled decode loop over a KV cache), its sampling rules, and the state a
conversation keeps between calls."""
from qwen3vl.infer.generate import DecodeState, generate
from qwen3vl.infer.sampling import Sampling

__all__ = ["generate", "DecodeState", "Sampling"]
