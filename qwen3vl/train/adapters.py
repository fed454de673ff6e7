"""The parameter side of LoRA fine-tuning, on pure dicts (`nnx.to_pure_dict`): which leaves train, how a LoRA
model's parameters are built from a base model's, and how adapters fold back into plain weights.

With adapters, only the adapter leaves (`lora.is_adapter`) are trained and checkpointed; everything else is the
frozen base, rebuilt from its source (`config.init_from`) on every start and never written by train.py. With no
adapters, everything trains and the frozen part is empty: one code path for full and LoRA fine-tuning.
"""
from __future__ import annotations

import zlib

import jax
import numpy as np

from qwen3vl.config import ModelConfig
from qwen3vl.model import quant
from qwen3vl.model.lora import SUFFIX


def split(params: dict, cfg: ModelConfig) -> tuple[dict, dict]:
  """(trainable, frozen) pure dicts: adapters and the rest with adapters, (params, {}) without."""
  if not cfg.lora_rank:
    return params, {}

  def pick(tree, keep):
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        sub = pick(value, keep) if not str(key).endswith(SUFFIX) else (value if keep else {})
        if sub:
          out[key] = sub
      elif not keep:
        out[key] = value
    return out
  return pick(params, True), pick(params, False)


def join(a: dict, b: dict) -> dict:
  """The union of two pure dicts with disjoint leaves."""
  out = dict(a)
  for key, value in b.items():
    out[key] = join(out[key], value) if key in out and isinstance(value, dict) else value
  return out


def conform(tree: dict, like: dict) -> dict:
  """`tree` with the keys of `like` (Orbax restores the integer keys of list nodes as strings)."""
  out = {}
  for key, spec in like.items():
    value = tree[key] if key in tree else tree[str(key)]
    out[key] = conform(value, spec) if isinstance(spec, dict) else value
  return out


def count(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def build(abstract: dict, base: dict, cfg: ModelConfig, seed: int = 0) -> dict:
  """Host parameters of `cfg`'s model (shaped like `abstract`: ShapeDtypeStructs) from a plain model's host
  parameters `base`: weights cast to their dtype, quantized where the model holds codes (`<w>_scale` beside
  `<w>`), adapters initialized as `lora.LoRA` does (A uniform in +-1/sqrt(in), B zero) from `seed`."""
  def fill(target: dict, source: dict, where: tuple[str, ...]):
    out = {}
    for key, spec in target.items():
      path = (*where, str(key))
      if str(key).endswith(SUFFIX):
        out[key] = {"a": _init_a(spec["a"], seed, path), "b": np.zeros(spec["b"].shape, spec["b"].dtype)}
      elif isinstance(spec, dict):
        out[key] = fill(spec, source[key], path)
      elif str(key).endswith("_scale"):
        continue  # written with its weight
      elif f"{key}_scale" in target:
        out[key], out[f"{key}_scale"] = _quantize_stacked(np.asarray(source[key]), cfg.base_quant)
      else:
        if tuple(np.shape(source[key])) != tuple(spec.shape):
          raise ValueError(f"parameter {'.'.join(path)}: the base has shape {np.shape(source[key])}, the model "
                           f"{tuple(spec.shape)}")
        out[key] = np.asarray(source[key]).astype(spec.dtype)
    return out
  return fill(abstract, base, ())


def _init_a(spec, seed: int, path: tuple[str, ...]) -> np.ndarray:
  rng = np.random.default_rng([seed, zlib.crc32(".".join(path).encode())])
  bound = 1.0 / spec.shape[-2] ** 0.5
  return rng.uniform(-bound, bound, spec.shape).astype(spec.dtype)


def _quantize_stacked(w: np.ndarray, kind: str):
  """Quantized one matrix at a time (host temporaries of one layer, not of the stack)."""
  if w.ndim == 2:
    return quant.quantize(w, kind)
  parts = [_quantize_stacked(w[i], kind) for i in range(w.shape[0])]
  return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])


def merge(params: dict, cfg: ModelConfig) -> dict:
  """Adapters folded into their weights (w + alpha / r * A B, dequantized first where held as codes): the
  parameters of the plain model `cfg.replace(lora_rank=0, base_quant="")`, as float32 host arrays where a weight
  was adapted or quantized, other leaves as they were."""
  scale = cfg.lora_spec.scale if cfg.lora_rank else 0.0

  def walk(tree: dict):
    out = {}
    for key, value in tree.items():
      if str(key).endswith((SUFFIX, "_scale")):
        continue
      if isinstance(value, dict):
        out[key] = walk(value)
        continue
      w, lora, codes_scale = value, tree.get(f"{key}{SUFFIX}"), tree.get(f"{key}_scale")
      if codes_scale is not None:
        w = np.asarray(quant.dequantize(np.asarray(w), np.asarray(codes_scale), np.float32))
      if lora is not None:
        ab = np.matmul(np.asarray(lora["a"], np.float32), np.asarray(lora["b"], np.float32))
        w = np.asarray(w, np.float32) + scale * ab
      out[key] = np.asarray(w)
    return out
  return walk(params)
