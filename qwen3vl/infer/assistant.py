"""A loaded checkpoint that answers chat messages: what infer.py (and a notebook) talks to.

`Assistant(path)` accepts a Hugging Face Qwen3-VL directory (config.json, safetensors, tokenizer.json,
preprocessor_config.json, optional generation_config.json) or a train.py work directory (model_config.json,
tokenizer.json, config.json and Orbax checkpoints/, newest step). Prompts go through the same chat template,
image / video processors and placeholder expansion as training, then `generate`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from qwen3vl import hf
from qwen3vl.config import ModelConfig
from qwen3vl.data import chat
from qwen3vl.data.image import ImageProcessor
from qwen3vl.data.tokenizer import Tokenizer
from qwen3vl.data.video import VideoProcessor
from qwen3vl.infer.generate import generate
from qwen3vl.model.vlm import Qwen3VL


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _load_workdir(path: str, dtype: str | None):
  """Model, tokenizer and processors of a train.py work directory (parameters of the newest checkpoint)."""
  from qwen3vl.train.checkpoint import Checkpointer
  runtime = {"dtype": dtype or "float32", "param_dtype": "float32"}
  cfg = ModelConfig.from_dict({**_read_json(os.path.join(path, "model_config.json")), **runtime})
  ckpt = Checkpointer(path, keep=1000, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"{path}: a train.py work directory with no checkpoint under checkpoints/")
  params = ckpt.restore_params(step)
  ckpt.close()
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
  model = nnx.merge(graphdef, state)
  data = _read_json(os.path.join(path, "config.json")).get("data", {})
  geometry = dict(patch_size=cfg.vision.patch_size, temporal_patch_size=cfg.vision.temporal_patch_size,
                  merge_size=cfg.vision.spatial_merge_size)
  pixels = {k: data[k] for k in ("min_pixels", "max_pixels") if data.get(k)}
  return (model, Tokenizer.from_file(os.path.join(path, "tokenizer.json")),
          ImageProcessor(**geometry, **pixels), VideoProcessor(**geometry), [], f"step {step}")


def _load_hf(path: str, dtype: str | None):
  model = hf.load_pretrained(path, dtype=dtype)
  stops = []
  gen = os.path.join(path, "generation_config.json")
  if os.path.exists(gen):
    eos = _read_json(gen).get("eos_token_id")
    stops = [eos] if isinstance(eos, int) else list(eos or [])
  video = (VideoProcessor.from_pretrained(path)
           if os.path.exists(os.path.join(path, "video_preprocessor_config.json")) else VideoProcessor())
  return model, Tokenizer.from_file(path), ImageProcessor.from_pretrained(path), video, stops, "HF"


@dataclasses.dataclass
class Reply:
  text: str
  token_ids: list[int]
  prompt_tokens: int


class Assistant:

  def __init__(self, path: str, *, dtype: str | None = None):
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"checkpoint directory not found: {path!r}")
    if os.path.exists(os.path.join(path, "model_config.json")):
      loaded = _load_workdir(path, dtype)
    elif os.path.exists(os.path.join(path, "config.json")):
      loaded = _load_hf(path, dtype)
    else:
      raise FileNotFoundError(f"{path!r} is neither a HF Qwen3-VL directory (config.json) nor a train.py work "
                              "directory (model_config.json)")
    self.model, self.tokenizer, self.image_processor, self.video_processor, stops, self.source = loaded
    ids = self.tokenizer.special_ids
    self.stop_ids = sorted(set(stops) | {ids["im_end"], ids["pad"]})
    self.pad_id = ids["pad"]

  def inputs(self, messages: Sequence[dict], images: Sequence[Any] = (), videos: Sequence[Any] = ()) -> dict:
    """Token ids [1, L] and vision arrays for a conversation ending with a user turn (images / videos in the
    order their {"type": "image"} / {"type": "video"} items appear)."""
    out: dict[str, Any] = {}
    image_grid = video_grid = stamps = None
    if images:
      out["pixel_values"], image_grid = self.image_processor(list(images))
      out["image_grid_thw"] = image_grid
    if videos:
      feats = self.video_processor(list(videos))
      out["pixel_values_videos"], video_grid, stamps = feats
      out["video_grid_thw"] = video_grid
    prompt = chat.build_prompt(messages, image_grid, video_grid, stamps, add_generation_prompt=True,
                               merge_size=self.image_processor.merge_size)
    out["input_ids"] = np.asarray([self.tokenizer.encode(prompt)], np.int32)
    return out

  def reply(self, messages: Sequence[dict], images: Sequence[Any] = (), videos: Sequence[Any] = (), *,
            max_new_tokens: int = 128, stop_strings: Sequence[str] = (), **sampling) -> Reply:
    inputs = self.inputs(messages, images, videos)
    ids = inputs.pop("input_ids")
    tokens = generate(self.model, ids, **inputs, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids,
                      pad_id=self.pad_id, **sampling)[0]
    kept = [int(t) for t in tokens]
    for k, t in enumerate(kept):
      if t in self.stop_ids:
        kept = kept[:k]
        break
    text = self.tokenizer.decode(kept, skip_special_tokens=True)
    for s in stop_strings:
      if s and s in text:
        text = text[:text.index(s)]
    return Reply(text, kept, int(ids.shape[1]))
