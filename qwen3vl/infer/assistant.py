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
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from qwen3vl import hf
from qwen3vl.data import chat
from qwen3vl.data.datasets import processors_for
from qwen3vl.data.image import ImageProcessor
from qwen3vl.data.tokenizer import Tokenizer
from qwen3vl.data.video import VideoProcessor
from qwen3vl.infer.generate import generate
from qwen3vl.model.vlm import Qwen3VL


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _load_workdir(path: str, dtype: str | None):
  """Model, tokenizer and processors of a train.py work directory (parameters of the newest checkpoint; a LoRA
  run's adapters folded into its base)."""
  from qwen3vl.train import adapters, init_from
  plain, params, step = init_from.workdir_params(path)
  cfg = plain.replace(dtype=dtype or "float32", param_dtype="float32")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))
  params = adapters.conform(params, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jax.numpy.asarray(x, jax.numpy.float32)
                                               if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, params))
  model = nnx.merge(graphdef, state)
  data = _read_json(os.path.join(path, "config.json")).get("data", {})
  image_processor, video_processor = processors_for(cfg.vision, min_pixels=data.get("min_pixels"),
                                                    max_pixels=data.get("max_pixels"))
  return (model, Tokenizer.from_file(os.path.join(path, "tokenizer.json")), image_processor, video_processor, [],
          f"step {step}")


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


def user_turn(text: str, n_images: int = 0, n_videos: int = 0) -> dict:
  """A user message: its images, then its videos, then the text (the order the processors expect)."""
  content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": text}]
  return {"role": "user", "content": content}


@dataclasses.dataclass
class Reply:
  text: str
  token_ids: list[int]
  prompt_tokens: int


class Assistant:

  def __init__(self, path: str, *, dtype: str | None = None, kv_cache: str = "auto"):
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
    self.pad_id, self.im_end = ids["pad"], ids["im_end"]
    self.kv_cache = kv_cache

  def inputs(self, messages: Sequence[dict], images: Sequence[Any] = (), videos: Sequence[Any] = (), *,
             prefix: Sequence[int] = ()) -> dict:
    """Token ids [1, L] (`prefix` ids, then the rendered messages and the assistant header) and vision arrays
    (images / videos in the order their {"type": "image"} / {"type": "video"} items appear)."""
    out: dict[str, Any] = {}
    image_grid = video_grid = stamps = None
    if images:
      out["pixel_values"], image_grid = self.image_processor(list(images))
      out["image_grid_thw"] = image_grid
    if videos:
      out["pixel_values_videos"], video_grid, stamps = self.video_processor(list(videos))
      out["video_grid_thw"] = video_grid
    prompt = chat.build_prompt(messages, image_grid, video_grid, stamps, add_generation_prompt=True,
                               merge_size=self.image_processor.merge_size,
                               token_ratio=self.model.config.vision_token_ratio)
    out["input_ids"] = np.asarray([list(prefix) + self.tokenizer.encode(prompt)], np.int32)
    return out

  def reply(self, messages: Sequence[dict], images: Sequence[Any] = (), videos: Sequence[Any] = (), *,
            stream: Callable[[str], None] | None = None, **options) -> Reply:
    """The answer to a conversation ending with a user turn; `stream(text)` gets the answer piece by piece."""
    return self.replies([(messages, images, videos)], stream=stream, **options)[0]

  def replies(self, conversations: Sequence[tuple], *, max_new_tokens: int = 128, stop_strings: Sequence[str] = (),
              stream: Callable[[str], None] | None = None, **sampling) -> list[Reply]:
    """Answers to (messages, images, videos) conversations, decoded together as one left-padded batch."""
    batch = [self.inputs(*c) for c in conversations]
    tokens, _ = self._generate(stack_inputs(batch, self.pad_id), None, max_new_tokens, stop_strings, stream, sampling)
    return [self._reply(row, stop_strings, b["input_ids"].shape[1]) for row, b in zip(tokens, batch)]

  def chat(self, system: str | None = None) -> "Chat":
    """A conversation that keeps its KV cache between turns (see Chat)."""
    return Chat(self, system)

  def _generate(self, inputs, state, max_new_tokens, stop_strings, stream, sampling):
    printer = _StreamPrinter(self.tokenizer, self.stop_ids, stop_strings, stream) if stream else None
    out = generate(self.model, **inputs, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids, pad_id=self.pad_id,
                   kv_cache=self.kv_cache, stream=printer, state=state, return_state=True, **sampling)
    if printer:
      printer.flush()
    return out

  def _reply(self, tokens, stop_strings, prompt_tokens) -> Reply:
    kept = _until_stop([int(t) for t in tokens], self.stop_ids)
    return Reply(_cut(self.tokenizer.decode(kept, skip_special_tokens=True), stop_strings), kept, prompt_tokens)


class Chat:
  """Multi-turn chat over one KV cache: each turn writes only its new tokens (the end of the previous answer,
  the user message, the assistant header) after what the cache holds, so earlier turns, images included, are
  never recomputed. The cache holds the answers as generated (a stop string cuts the printed text only)."""

  def __init__(self, assistant: Assistant, system: str | None = None):
    self.assistant, self.state, self.last = assistant, None, None
    self.system = [{"role": "system", "content": system}] if system else []

  def say(self, text: str, images: Sequence[Any] = (), videos: Sequence[Any] = (), *, max_new_tokens: int = 128,
          stop_strings: Sequence[str] = (), stream: Callable[[str], None] | None = None, **sampling) -> Reply:
    a = self.assistant
    user = [user_turn(text, len(images), len(videos))]
    if self.state is None:
      inputs = a.inputs(self.system + user, images, videos)
    else:  # close the previous answer as the template would: its last token (unless a stop), then <|im_end|>\n
      prefix = ([] if self.last in a.stop_ids else [self.last]) + [a.im_end] + a.tokenizer.encode("\n")
      inputs = a.inputs(user, images, videos, prefix=prefix)
    tokens, self.state = a._generate(inputs, self.state, max_new_tokens, stop_strings, stream, sampling)
    row = [int(t) for t in tokens[0]]
    self.last = next((t for t in row if t in a.stop_ids), row[-1])
    return a._reply(row, stop_strings, inputs["input_ids"].shape[1])


def stack_inputs(batch: Sequence[dict], pad_id: int) -> dict:
  """One left-padded batch (attention_mask) from single-row inputs; vision arrays concatenated in row order."""
  length = max(b["input_ids"].shape[1] for b in batch)
  ids = np.full((len(batch), length), pad_id, np.int32)
  mask = np.zeros((len(batch), length), np.int32)
  for r, b in enumerate(batch):
    n = b["input_ids"].shape[1]
    ids[r, length - n:], mask[r, length - n:] = b["input_ids"][0], 1
  out = {"input_ids": ids, "attention_mask": mask}
  for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
    parts = [b[key] for b in batch if key in b]
    if parts:
      out[key] = np.concatenate(parts)
  return out


def _until_stop(tokens: list[int], stop_ids) -> list[int]:
  for k, t in enumerate(tokens):
    if t in stop_ids:
      return tokens[:k]
  return tokens


def _cut(text: str, stop_strings: Sequence[str]) -> str:
  for s in stop_strings:
    if s and s in text:
      text = text[:text.index(s)]
  return text


class _StreamPrinter:
  """Turns row 0's streamed token ids into text pieces: decodes what it has so far and passes on the new part,
  holding back an unfinished UTF-8 character and anything that may be the start of a stop string."""

  def __init__(self, tokenizer, stop_ids, stop_strings, sink: Callable[[str], None]):
    self.tokenizer, self.stop_ids, self.stop_strings, self.sink = tokenizer, set(stop_ids), stop_strings, sink
    self.ids, self.sent, self.finished = [], 0, False

  def __call__(self, step: int, tokens: np.ndarray):
    token = int(tokens[0])
    if self.finished or token in self.stop_ids:
      self.finished = True
      return
    self.ids.append(token)
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    cut = _cut(text, self.stop_strings)
    if cut != text:
      self.finished = True
    elif text.endswith("\ufffd"):  # maybe half a character: wait for the next token
      return
    else:
      cut = text[:len(text) - _held_back(text, self.stop_strings)]
    self._send(cut)

  def flush(self):
    """After the last token: whatever was held back (a dangling byte, a stop string's unfinished start)."""
    self._send(_cut(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stop_strings))

  def _send(self, text: str):
    if len(text) > self.sent:
      self.sink(text[self.sent:])
      self.sent = len(text)


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
  """Length of the longest end of `text` that begins some stop string."""
  return max([n for s in stop_strings for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
