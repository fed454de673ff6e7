"""LoRA adapters out in Hugging Face PEFT's format: `save_adapters(params, cfg, path)` writes adapter_config.json and
adapter_model.safetensors, which `peft.PeftModel.from_pretrained(hf_model, path)` loads onto transformers'
Qwen3VLForConditionalGeneration / Qwen3VLMoeForConditionalGeneration with the logits of our adapted model.

Module names come from hf.py's name table (the adapted weight's HF name without `.weight`), which stays the one
place that knows HF names. `target_modules` lists them in full: PEFT takes a target equal to a module's name, while
suffixes such as "linear_fc1" would also catch the vision blocks' MLP when only the mergers were adapted. A Linear's
adapter is ours transposed: lora_A [r, in] = A^T, lora_B [out, r] = B^T, so PEFT's s B A is our (s A B)^T.

MoE experts are fused parameters in transformers 5 (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]),
which PEFT adapts through `target_parameters` (checked with peft 0.21): per expert W_e + s B_e A_e, with lora_A
[E * r, in] holding the experts' A_e one after another and lora_B [out, r * E] interleaving them (column k * E + e),
our per-expert merge exactly. When both of a layer's expert parameters are adapted, PEFT nests its wrappers in the
module's parameter order, so the first (gate_up_proj) lands under `experts.base_layer.`. PEFT refuses dropout on
parameter adapters; dropout only acts in training, so an export with experts says lora_dropout 0.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from qwen3vl import hf
from qwen3vl.config import ModelConfig
from qwen3vl.model.lora import SUFFIX

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_EXPERT_ORDER = ("gate_up_proj", "down_proj")  # parameter order of transformers' experts module: PEFT's wrap order


def save_adapters(params: dict, cfg: ModelConfig, path: str, *, base_model_name_or_path: str | None = None):
  """Write the adapters of a pure dict of `cfg`'s model (`<weight>_lora` subtrees; other leaves are ignored) as a
  PEFT LoRA directory for the model at `base_model_name_or_path`."""
  tensors, modules, parameters = adapter_tensors(params, cfg)
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(adapter_config(cfg, modules, parameters, base_model_name_or_path), f, indent=2)


def adapter_tensors(params: dict, cfg: ModelConfig) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """(PEFT tensors by name, adapted module names, adapted parameter names) of the adapters in `params`."""
  if cfg.mod_every:
    raise ValueError("a Mixture-of-Depths model (mod_every > 0) has no Hugging Face equivalent to adapt")
  tensors, modules, experts = {}, [], {}  # experts: parameter name -> (lora_A, lora_B)
  for weight, lora in _adapters(params):
    a, b = np.asarray(lora["a"], np.float32), np.asarray(lora["b"], np.float32)
    stacked = weight.startswith(hf._STACKED)
    repeat = cfg.share_every if weight.startswith("layers.") else 1  # shared weights: adapted in every layer
    names, kind = hf._hf_names(weight, a.shape[0] * repeat if stacked else 1)
    for i, name in enumerate(names):
      ai, bi = (a[i // repeat], b[i // repeat]) if stacked else (a, b)
      if kind == "t":
        module = name.removesuffix(".weight")
        modules.append(module)
        tensors.update(_pair(module, ai.T, bi.T))
      elif kind == "experts":  # ai [E, in, r], bi [E, r, out]
        e, d_in, r = ai.shape
        experts[name] = (ai.transpose(0, 2, 1).reshape(e * r, d_in), bi.transpose(2, 1, 0).reshape(-1, r * e))
      else:
        raise ValueError(f"an adapter on {weight!r} ({name}) has no PEFT form")
  for name, (lora_a, lora_b) in experts.items():
    module, _, param = name.rpartition(".")
    later = [p for p in _EXPERT_ORDER[_EXPERT_ORDER.index(param) + 1:] if f"{module}.{p}" in experts]
    tensors.update(_pair(module + ".base_layer" * len(later), lora_a, lora_b))
  if not tensors:
    raise ValueError("no LoRA adapters (keys ending in '_lora') in the parameters")
  return tensors, modules, list(experts)


def adapter_config(cfg: ModelConfig, modules: list[str], parameters: list[str], base: str | None) -> dict:
  """adapter_config.json of plain LoRA (alpha / r scaling, no bias, DoRA or rsLoRA)."""
  alpha = cfg.lora_alpha
  config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "revision": None,
      "r": cfg.lora_rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
      "lora_dropout": 0.0 if parameters else cfg.lora_dropout, "target_modules": modules, "bias": "none",
      "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
      "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
      "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
  }
  if parameters:  # only then: older PEFT versions do not know the field
    config["target_parameters"] = parameters
  return config


def _pair(module: str, lora_a: np.ndarray, lora_b: np.ndarray) -> dict[str, np.ndarray]:
  return {f"{_PREFIX}{module}.lora_A.weight": np.ascontiguousarray(lora_a),
          f"{_PREFIX}{module}.lora_B.weight": np.ascontiguousarray(lora_b)}


def _adapters(tree: dict, where: tuple[str, ...] = ()):
  """(our weight's path, {"a", "b"}) of every adapter in a pure dict."""
  for key, value in tree.items():
    path = (*where, str(key))
    if path[-1].endswith(SUFFIX):
      yield ".".join(path)[:-len(SUFFIX)], value
    elif isinstance(value, dict):
      yield from _adapters(value, path)
