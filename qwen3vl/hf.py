"""Hugging Face checkpoints in and out: `load_pretrained(path)`, `save_pretrained(model, path)`.

Tensors are read one at a time from the safetensors shards (numpy, bf16 through ml_dtypes) and written into
preallocated stacked arrays, so host memory stays near one copy of the weights. The name table below is the
only place that knows HF names; MoE experts are accepted in the released layout (gate_up [E, H, 2I],
down [E, I, H]) and the transformers-5 layout ([E, 2I, H], [E, H, I]), and always written in the released one.
"""
from __future__ import annotations

import json
import os
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from qwen3vl.config import ModelConfig
from qwen3vl.model.vlm import Qwen3VL

# Our parameter path (after the stack prefix) -> (HF name, transform). Transforms map HF -> ours.
_VISION_BLOCK = {
    "norm1.scale": ("norm1.weight", "id"), "norm1.bias": ("norm1.bias", "id"),
    "norm2.scale": ("norm2.weight", "id"), "norm2.bias": ("norm2.bias", "id"),
    "qkv.kernel": ("attn.qkv.weight", "t"), "qkv.bias": ("attn.qkv.bias", "id"),
    "proj.kernel": ("attn.proj.weight", "t"), "proj.bias": ("attn.proj.bias", "id"),
    "fc1.kernel": ("mlp.linear_fc1.weight", "t"), "fc1.bias": ("mlp.linear_fc1.bias", "id"),
    "fc2.kernel": ("mlp.linear_fc2.weight", "t"), "fc2.bias": ("mlp.linear_fc2.bias", "id"),
}
_MERGER = {
    "norm.scale": ("norm.weight", "id"), "norm.bias": ("norm.bias", "id"),
    "fc1.kernel": ("linear_fc1.weight", "t"), "fc1.bias": ("linear_fc1.bias", "id"),
    "fc2.kernel": ("linear_fc2.weight", "t"), "fc2.bias": ("linear_fc2.bias", "id"),
}
_DECODER_LAYER = {
    "input_norm.scale": ("input_layernorm.weight", "id"),
    "post_attention_norm.scale": ("post_attention_layernorm.weight", "id"),
    "attn.q_proj.kernel": ("self_attn.q_proj.weight", "t"), "attn.k_proj.kernel": ("self_attn.k_proj.weight", "t"),
    "attn.v_proj.kernel": ("self_attn.v_proj.weight", "t"), "attn.o_proj.kernel": ("self_attn.o_proj.weight", "t"),
    "attn.q_norm.scale": ("self_attn.q_norm.weight", "id"), "attn.k_norm.scale": ("self_attn.k_norm.weight", "id"),
    "mlp.gate_proj.kernel": ("mlp.gate_proj.weight", "t"), "mlp.up_proj.kernel": ("mlp.up_proj.weight", "t"),
    "mlp.down_proj.kernel": ("mlp.down_proj.weight", "t"),
    "mlp.router": ("mlp.gate.weight", "t"),
    "mlp.gate_up": ("mlp.experts.gate_up_proj", "experts"), "mlp.down": ("mlp.experts.down_proj", "experts"),
}
_SINGLE = {
    "visual.patch_embed.kernel": ("model.visual.patch_embed.proj.weight", "conv"),
    "visual.patch_embed.bias": ("model.visual.patch_embed.proj.bias", "id"),
    "visual.pos_embed": ("model.visual.pos_embed.weight", "id"),
    "embed.embedding": ("model.language_model.embed_tokens.weight", "id"),
    "norm.scale": ("model.language_model.norm.weight", "id"),
    "lm_head.kernel": ("lm_head.weight", "t"),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


def _hf_names(path: str, num_layers: int) -> tuple[list[str], str]:
  """HF tensor names (one per stacked layer, or one) for one of our parameter paths, and the transform."""
  if path in _SINGLE:
    name, kind = _SINGLE[path]
    return [name], kind
  for prefix, hf_prefix, table in (("visual.blocks.", "model.visual.blocks.{}.", _VISION_BLOCK),
                                   ("layers.", "model.language_model.layers.{}.", _DECODER_LAYER)):
    if path.startswith(prefix) and path[len(prefix):] in table:
      name, kind = table[path[len(prefix):]]
      return [hf_prefix.format(i) + name for i in range(num_layers)], kind
  if path.startswith("visual.merger.") and path[len("visual.merger."):] in _MERGER:
    name, kind = _MERGER[path[len("visual.merger."):]]
    return ["model.visual.merger." + name], kind
  if path.startswith("visual.deepstack_mergers."):
    j, rest = path[len("visual.deepstack_mergers."):].split(".", 1)
    if rest in _MERGER:
      name, kind = _MERGER[rest]
      return [f"model.visual.deepstack_merger_list.{j}.{name}"], kind
  raise KeyError(f"no Hugging Face name for parameter {path!r}")


def _to_ours(x: np.ndarray, kind: str, shape: tuple[int, ...], name: str) -> np.ndarray:
  if kind == "t":
    x = x.T
  elif kind == "conv":  # Conv3d [D, C, T, P, P] is a Linear over the (c, t, y, x)-flattened patch
    x = x.reshape(x.shape[0], -1).T
  elif kind == "experts" and x.shape != shape:
    x = np.swapaxes(x, 1, 2)  # transformers-5 layout: [E, out, in]
  if x.shape != tuple(shape):
    raise ValueError(f"tensor {name!r} has shape {x.shape} after conversion, the model expects {tuple(shape)}")
  return x


def _to_hf(x: np.ndarray, kind: str, cfg: ModelConfig) -> np.ndarray:
  if kind == "t":
    return np.ascontiguousarray(x.T)
  if kind == "conv":
    v = cfg.vision
    return np.ascontiguousarray(x.T).reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size,
                                             v.patch_size)
  return np.ascontiguousarray(x)


_STACKED = ("visual.blocks.", "layers.")


class _Reader:
  """Lazily opened safetensors shards of a HF directory, by tensor name."""

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(f"no .safetensors files in {path!r}")
      weight_map = {}
      for file in files:
        with safe_open(os.path.join(path, file), "numpy") as f:
          weight_map.update({k: file for k in f.keys()})
    self.path, self.weight_map, self._open = path, weight_map, {}

  def get(self, name: str) -> np.ndarray:
    file = self.weight_map[name]
    if file not in self._open:
      self._open[file] = safe_open(os.path.join(self.path, file), "numpy")
    return self._open[file].get_tensor(name)


def load_pretrained(path: str, dtype: str | None = None, **runtime) -> Qwen3VL:
  """Load a local HF Qwen3-VL / Qwen3-VL-MoE directory (config.json + safetensors) into a `Qwen3VL`.

  `dtype` sets the parameter and compute dtype (default: float32); `runtime` sets other `ModelConfig`
  switches (scan_layers, attention_impl, moe_impl). Missing, unexpected and mis-shaped tensors raise errors
  that name them.
  """
  if dtype is not None:
    runtime = {"dtype": dtype, "param_dtype": dtype, **runtime}
  cfg = ModelConfig.from_pretrained(path, **runtime)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, read_params(path, cfg)))
  return nnx.merge(graphdef, state)


def read_params(path: str, cfg: ModelConfig) -> dict:
  """The parameters of a HF directory as host (numpy) arrays in a pure dict shaped like `cfg`'s model without
  adapters (`nnx.to_pure_dict`), in `cfg.param_dtype`; nothing goes to a device."""
  cfg = cfg.replace(lora_rank=0, base_quant="")
  state = nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))[1]
  reader = _Reader(path)
  used, missing, flat = set(), [], []
  for key, var in nnx.to_flat_state(state):
    path_str, leaf = ".".join(str(k) for k in key), var.get_value()
    stacked = path_str.startswith(_STACKED)
    names, kind = _hf_names(path_str, leaf.shape[0] if stacked else 1)
    absent = [n for n in names if n not in reader.weight_map]
    if absent:
      missing.extend(absent)
      continue
    out = np.empty(leaf.shape, dtype=leaf.dtype)
    for i, name in enumerate(names):
      x = _to_ours(reader.get(name), kind, leaf.shape[1:] if stacked else leaf.shape, name)
      out[i if stacked else ...] = x
      used.add(name)
    flat.append((key, var.replace(out)))
  if missing:
    hint = (" (the config says the LM head is untied, so lm_head.weight must be present)"
            if "lm_head.weight" in missing else "")
    raise ValueError(f"checkpoint {path!r} is missing {len(missing)} tensor(s): {missing[:10]}{hint}")
  unexpected = sorted(n for n in reader.weight_map if n not in used and not n.endswith(_IGNORED_SUFFIXES)
                      and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
  if unexpected:
    raise ValueError(f"checkpoint {path!r} has {len(unexpected)} unexpected tensor(s): {unexpected[:10]}")
  return nnx.to_pure_dict(nnx.from_flat_state(flat))


def save_pretrained(model: Qwen3VL, path: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
  """Write config.json and safetensors shards (with an index when more than one) in the released layout; a model
  with shared decoder weights (`share_every`) is written out as the equivalent unshared model."""
  cfg = model.config
  if cfg.mod_every:
    raise ValueError("a Mixture-of-Depths model (mod_every > 0) has no Hugging Face equivalent; keep its Orbax "
                     "checkpoint (train.py's work directory)")
  os.makedirs(path, exist_ok=True)
  state = nnx.state(model, nnx.Param)
  shards, current, size = [], {}, 0
  for key, var in nnx.to_flat_state(state):
    path_str, value = ".".join(str(k) for k in key), np.asarray(var.get_value())
    stacked = path_str.startswith(_STACKED)
    repeat = cfg.share_every if path_str.startswith("layers.") else 1  # shared weights: written for every layer
    names, kind = _hf_names(path_str, value.shape[0] * repeat if stacked else 1)
    for i, name in enumerate(names):
      tensor = _to_hf(value[i // repeat] if stacked else value, kind, cfg)
      if current and size + tensor.nbytes > max_shard_bytes:
        shards.append(current)
        current, size = {}, 0
      current[name] = tensor
      size += tensor.nbytes
  shards.append(current)
  weight_map = {}
  for i, shard in enumerate(shards):
    file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in shard})
  if len(shards) > 1:
    total = sum(t.nbytes for s in shards for t in s.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_hf(), f, indent=2)


def load_image_processor(path: str):
  """The image processor of a HF directory (`preprocessor_config.json`): `processor(images)` returns
  `(pixel_values, image_grid_thw)` as HF's would."""
  from qwen3vl.data.image import ImageProcessor
  return ImageProcessor.from_pretrained(path)
