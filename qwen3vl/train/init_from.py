"""Where a run's starting weights come from (`config.init_from`): a Hugging Face directory or a train.py work
directory, read to host memory (numpy) so nothing but the final placement touches a device.

A work directory of a LoRA run holds only its adapters and the path of its base (Orbax item `base`); reading it
rebuilds the base the way the run held it (quantized when it was), and folds the adapters in: a LoRA run can
start from another one, and infer.py serves one like any other work directory.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from qwen3vl import hf
from qwen3vl.config import RUNTIME_FIELDS, ModelConfig
from qwen3vl.train import adapters

PLAIN = dict(lora_rank=0, base_quant="", lora_targets=())  # a model without adapters or quantized weights


def is_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "model_config.json"))


def architecture(path: str, **runtime) -> ModelConfig:
  """The model config of a source: its architecture, with the given runtime switches."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.init_from {path!r} is not a directory")
  if is_workdir(path):
    with open(os.path.join(path, "model_config.json")) as f:
      fields = {k: v for k, v in json.load(f).items() if k not in RUNTIME_FIELDS}
    return ModelConfig.from_dict({**fields, **runtime})
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"config.init_from {path!r} has neither config.json (a Hugging Face directory) nor "
                            f"model_config.json (a train.py work directory)")
  return ModelConfig.from_pretrained(path, **runtime)


def tokenizer_file(path: str) -> str | None:
  file = os.path.join(path, "tokenizer.json")
  return file if os.path.isfile(file) else None


def base_params(path: str, cfg: ModelConfig) -> dict:
  """Host parameters of the plain model (`cfg` without adapters) from a source, in `cfg.param_dtype`."""
  plain = cfg.replace(**PLAIN)
  if is_workdir(path):
    abstract = abstract_params(plain)
    params = adapters.conform(workdir_params(path)[1], abstract)
    return jax.tree.map(lambda x, s: np.asarray(x).astype(s.dtype), params, abstract)
  return hf.read_params(path, plain)


def abstract_params(cfg: ModelConfig) -> dict:
  """The pure dict of `cfg`'s model as ShapeDtypeStructs (nothing allocated)."""
  from qwen3vl.model.vlm import Qwen3VL
  return nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))[1])


def run_config(path: str) -> ModelConfig:
  """The model config a work directory's run trained (model_config.json: with its adapters and runtime fields)."""
  with open(os.path.join(path, "model_config.json")) as f:
    return ModelConfig.from_dict(json.load(f))


def restore(path: str) -> tuple[ModelConfig, dict, dict, int]:
  """(the run's model config, with any adapters; host parameters of its newest checkpoint as saved: a LoRA run's
  adapters only, list keys as Orbax restores them; the Orbax item `base`: {"init_from": path} for a LoRA run;
  the checkpoint's step)."""
  from qwen3vl.train.checkpoint import Checkpointer
  cfg = run_config(path)
  ckpt = Checkpointer(path, keep=1000, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"{path}: a train.py work directory with no checkpoint under checkpoints/")
    params, base = ckpt.restore_params(step), ckpt.restore_base(step)
  finally:
    ckpt.close()
  return cfg, jax.tree.map(np.asarray, params), base, step


def workdir_params(path: str) -> tuple[ModelConfig, dict, int]:
  """(the run's model config without adapters, host parameters of its newest checkpoint with any adapters
  folded in, that checkpoint's step)."""
  cfg, params, base, step = restore(path)
  if cfg.lora_rank:
    if not base.get("init_from"):
      raise ValueError(f"{path}: a LoRA run whose checkpoint does not name its base (Orbax item 'base')")
    abstract = abstract_params(cfg)
    frozen = adapters.split(adapters.build(abstract, base_params(base["init_from"], cfg), cfg), cfg)[1]
    trained = adapters.conform(params, adapters.split(abstract, cfg)[0])
    params = adapters.merge(adapters.join(frozen, trained), cfg)
  return cfg.replace(**PLAIN), params, step
