"""Training samples from conversation records: LLaVA/ShareGPT JSONL files and the synthetic set.

A record (JSONL line, or what `synthetic.make_record` returns) is turned into one `Sample`: token ids, next-token
targets, a loss mask over the assistant replies, MRoPE positions and the visual patches. One code path for every
source, so what is tested on synthetic data is what runs on real data.

Record forms accepted (paths relative to the JSONL file):
* LLaVA/ShareGPT: {"image": "a.png" | ["a.png", ...], "video": "clip.gif" | "frames_dir" | ["f0.png", ...],
  "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}
  (also "images": [...], "videos": [video, ...], "fps"/"video_fps": source frame rate of the video(s));
* HF messages: {"messages": [{"role": "user", "content": "<image>..." | [{"type": "image"}, {"type": "text",
  "text": ...}]}, ...], "images": [...]}.
`<image>` / `<video>` markers in user turns become image / video items in order (one "\\n" right after a marker is
dropped, since the template puts text right after the vision block, as at inference); with no marker at all the
images (then videos) go to the start of the first user turn. Only user turns carry vision items.

Bad records never crash training: `SampleBuilder` raises `SkipSample(reason)`, the loader counts the reason.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import numpy as np

from qwen3vl.data import chat
from qwen3vl.data.image import ImageLoadError, ImageProcessor
from qwen3vl.data.tokenizer import Tokenizer
from qwen3vl.data.video import VideoProcessor
from qwen3vl.model.positions import get_rope_index

__all__ = ["SkipSample", "SKIP_REASONS", "Sample", "SampleBuilder", "JsonlSource", "to_messages", "processors_for"]

SKIP_REASONS = ("bad_record", "missing_image", "corrupt_image", "bad_image", "token_mismatch", "too_long",
                "too_many_patches", "no_targets", "error")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MARKER = re.compile(r"(<image>|<video>)\n?")


class SkipSample(Exception):
    """A record that cannot become a training sample; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Sample:
    """One tokenized example. loss_mask[i] weights predicting targets[i] = input_ids[i + 1]."""
    input_ids: np.ndarray  # int32 [L]
    targets: np.ndarray  # int32 [L]; last = pad
    loss_mask: np.ndarray  # float32 [L]; 1 where targets[i] is an assistant reply token (or its <|im_end|>)
    positions: np.ndarray  # int32 [3, L]: get_rope_index of this sample alone
    image_pixels: np.ndarray  # float32 [P_img, patch_dim] (P_img may be 0)
    image_grid_thw: np.ndarray  # int64 [n_images, 3]
    video_pixels: np.ndarray  # float32 [P_vid, patch_dim]
    video_grid_thw: np.ndarray  # int64 [n_videos, 3]

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.image_pixels.shape[0] + self.video_pixels.shape[0])


# ------------------------------------------------------------------------------------------------ records

def _split_markers(text: str) -> list[dict]:
    items = []
    for k, piece in enumerate(_MARKER.split(text)):  # odd entries are the captured markers
        if k % 2:
            items.append({"type": piece[1:-1]})
        elif piece:
            items.append({"type": "text", "text": piece})
    return items


def _content_items(content: Any) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return _split_markers(content)
    if isinstance(content, list):
        out = []
        for item in content:
            if isinstance(item, str):
                out.extend(_split_markers(item))
            elif isinstance(item, dict) and (item.get("type") == "image" or "image" in item):
                out.append({"type": "image"})
            elif isinstance(item, dict) and (item.get("type") == "video" or "video" in item):
                out.append({"type": "video"})
            elif isinstance(item, dict) and "text" in item:
                out.extend(_split_markers(str(item["text"])))
            else:
                raise SkipSample("bad_record", f"unsupported content item {item!r:.80}")
        return out
    raise SkipSample("bad_record", f"content must be a string or a list, got {type(content).__name__}")


def to_messages(record: dict) -> list[dict]:
    """The record's turns as render_chat messages; user content as items, others as plain text."""
    raw = record.get("conversations", record.get("messages"))
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise SkipSample("bad_record", "record needs 'conversations' or 'messages': a list of turn objects")
    turns = [(t.get("from", t.get("role")), t.get("value", t.get("content"))) for t in raw]
    images, videos = len(record.get("images") or ()), len(record.get("videos") or ())
    messages = []
    for role, content in turns:
        if role not in _ROLES:
            raise SkipSample("bad_record", f"unknown role {role!r}")
        role = _ROLES[role]
        if role == "user":
            messages.append({"role": "user", "content": _content_items(content)})
        elif isinstance(content, str) or content is None:  # vision markers outside user turns stay text
            messages.append({"role": role, "content": content or ""})
        elif isinstance(content, list):
            messages.append({"role": role, "content": "".join(
                i if isinstance(i, str) else str(i.get("text", "")) for i in content)})
        else:
            raise SkipSample("bad_record", f"content must be a string or a list, got {type(content).__name__}")
    user_items = [i for m in messages if m["role"] == "user" for i in m["content"]]
    n_img = sum(i["type"] == "image" for i in user_items)
    n_vid = sum(i["type"] == "video" for i in user_items)
    if n_img == 0 and n_vid == 0 and (images or videos):
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise SkipSample("bad_record", "record has images/videos but no user turn")
        first["content"] = [{"type": "image"}] * images + [{"type": "video"}] * videos + first["content"]
    elif n_img != images or n_vid != videos:
        raise SkipSample("token_mismatch", f"{n_img} <image> / {n_vid} <video> markers for {images} images / "
                                           f"{videos} videos")
    return messages


# ------------------------------------------------------------------------------------------------ builder

def processors_for(vision, *, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> tuple[ImageProcessor, VideoProcessor]:
    """Image and video processors cut to a model's vision config (patch, temporal patch and merge sizes), as
    training and inference must agree; min/max pixels bound images only (videos keep the HF class defaults)."""
    geometry = dict(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                    merge_size=vision.spatial_merge_size)
    pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    return ImageProcessor(**geometry, **pixels), VideoProcessor(**geometry)


class SampleBuilder:
    """record -> Sample: render the chat, expand the vision placeholders with the real grids, tokenize, mask.

    min_pixels/max_pixels bound each image's resized area (HF defaults: 65536 .. 16777216; the synthetic 64 px
    images keep their size with min_pixels <= 4096). Videos use `video_processor` (HF class defaults).
    """

    def __init__(self, tokenizer: Tokenizer, *, max_length: int, min_pixels: int | None = None,
                 max_pixels: int | None = None, image_processor: ImageProcessor | None = None,
                 video_processor: VideoProcessor | None = None, system_prompt: str | None = None,
                 token_ratio: float = 1.0):
        image_processor = image_processor or ImageProcessor()
        overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.image_processor = dataclasses.replace(image_processor, **overrides)
        self.video_processor = video_processor or VideoProcessor()
        self.tokenizer, self.max_length, self.system_prompt = tokenizer, int(max_length), system_prompt
        self.merge = self.image_processor.merge_size
        self.token_ratio = float(token_ratio)  # vision-token merging: pad tokens per frame (model/token_merge.py)
        self.ids = tokenizer.special_ids
        self.patch_dim = 3 * self.image_processor.temporal_patch_size * self.image_processor.patch_size ** 2

    def _images(self, images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        if not images:
            return np.zeros((0, self.patch_dim), np.float32), np.zeros((0, 3), np.int64)
        try:
            return self.image_processor(list(images))
        except FileNotFoundError as e:
            raise SkipSample("missing_image", str(e)) from None
        except ImageLoadError as e:
            raise SkipSample("corrupt_image", str(e)) from None
        except (ValueError, TypeError) as e:  # aspect ratio > 200, unsupported input, ...
            raise SkipSample("bad_image", str(e)) from None

    def _videos(self, videos: Sequence[Any], fps: Any) -> tuple[np.ndarray, np.ndarray, list]:
        if not videos:
            return np.zeros((0, self.patch_dim), np.float32), np.zeros((0, 3), np.int64), []
        fps_list = list(fps) if isinstance(fps, (list, tuple)) else [fps] * len(videos)
        rows, grids, stamps = [], [], []
        for k, (video, f) in enumerate(zip(videos, fps_list)):
            try:
                r, g, ts = self.video_processor.preprocess_one(video, f, name=f"video {k}")
            except FileNotFoundError as e:
                raise SkipSample("missing_image", str(e)) from None
            except ImageLoadError as e:
                raise SkipSample("corrupt_image", str(e)) from None
            except (ValueError, TypeError) as e:
                raise SkipSample("bad_image", str(e)) from None
            rows.append(r)
            grids.append(g)
            stamps.append(ts)
        return np.concatenate(rows), np.asarray(grids, np.int64), stamps

    def _text(self, messages, image_grid, video_grid, stamps) -> tuple[str, list[tuple[int, int]]]:
        """Expanded prompt text and the character spans of assistant replies (+ their <|im_end|>).

        Rendered message by message (the template is a concatenation of turns), so each reply's span is known
        exactly; placeholders of each turn are expanded with that turn's grids.
        """
        text, spans, img, vid, prev = "", [], 0, 0, ""
        head = chat.IM_START + "assistant\n"
        for k in range(len(messages)):
            full = chat.render_chat(messages[:k + 1])
            piece, prev = full[len(prev):], full
            if messages[k]["role"] == "user":
                ni, nv = piece.count(chat.IMAGE_PAD), piece.count(chat.VIDEO_PAD)
                piece = chat.expand_vision_placeholders(piece, image_grid[img:img + ni], video_grid[vid:vid + nv],
                                                        stamps[vid:vid + nv], self.merge,
                                                        token_ratio=self.token_ratio)
                img, vid = img + ni, vid + nv
            elif messages[k]["role"] == "assistant":
                assert piece.startswith(head) and piece.endswith(chat.IM_END + "\n"), piece
                spans.append((len(text) + len(head), len(text) + len(piece) - 1))
            text += piece
        return text, spans

    def __call__(self, record: dict) -> Sample:
        if not isinstance(record, dict):
            raise SkipSample("bad_record", f"record must be a dict, got {type(record).__name__}")
        messages = to_messages(record)
        if self.system_prompt and messages and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if not any(m["role"] == "assistant" for m in messages):
            raise SkipSample("no_targets", "no assistant turn")
        image_pixels, image_grid = self._images(record.get("images") or [])
        video_pixels, video_grid, stamps = self._videos(record.get("videos") or [],
                                                        record.get("video_fps", record.get("fps")))
        try:
            text, spans = self._text(messages, image_grid, video_grid, stamps)
        except ValueError as e:  # placeholder / grid count disagreement
            raise SkipSample("token_mismatch", str(e)) from None
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        starts = np.array([s for s, _ in offsets], np.int64)
        in_reply = np.zeros(len(ids), bool)
        for a, b in spans:
            in_reply |= (starts >= a) & (starts < b)
        if not in_reply[1:].any():
            raise SkipSample("no_targets", "assistant replies are empty")
        return self._sample(ids, in_reply, image_pixels, image_grid, video_pixels, video_grid)

    def prompt(self, record: dict) -> Sample:
        """The record's conversation up to its last user turn and the assistant header, with no loss: what a
        policy answers in post-training (its reference reply, if any, left out). `answered` appends an answer."""
        if not isinstance(record, dict):
            raise SkipSample("bad_record", f"record must be a dict, got {type(record).__name__}")
        messages = to_messages(record)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or messages[-1]["role"] != "user":
            raise SkipSample("bad_record", "no user turn to answer")
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        image_pixels, image_grid = self._images(record.get("images") or [])
        video_pixels, video_grid, stamps = self._videos(record.get("videos") or [],
                                                        record.get("video_fps", record.get("fps")))
        try:
            text, _ = self._text(messages, image_grid, video_grid, stamps)
        except ValueError as e:
            raise SkipSample("token_mismatch", str(e)) from None
        ids = self.tokenizer.encode(text + chat.IM_START + "assistant\n")
        return self._sample(ids, np.zeros(len(ids), bool), image_pixels, image_grid, video_pixels, video_grid)

    def answered(self, prompt: Sample, answer_ids) -> Sample:
        """`prompt` followed by an answer's token ids as sampled (its stop token included), the loss on them."""
        ids = np.concatenate([prompt.input_ids, np.asarray(answer_ids, np.int32)])
        in_reply = np.arange(len(ids)) >= prompt.length
        return self._sample(ids, in_reply, prompt.image_pixels, prompt.image_grid_thw, prompt.video_pixels,
                            prompt.video_grid_thw)

    def _sample(self, ids, in_reply, image_pixels, image_grid, video_pixels, video_grid) -> Sample:
        """Token ids and which of them are the reply -> Sample (targets, loss mask, MRoPE positions)."""
        if len(ids) > self.max_length:
            raise SkipSample("too_long", f"{len(ids)} tokens > max_length {self.max_length}")
        input_ids = np.asarray(ids, np.int32)
        try:
            positions, _ = get_rope_index(
                input_ids[None], image_grid if len(image_grid) else None, video_grid if len(video_grid) else None,
                image_token_id=self.ids["image_token_id"], video_token_id=self.ids["video_token_id"],
                vision_start_token_id=self.ids["vision_start_token_id"], spatial_merge_size=self.merge,
                token_ratio=self.token_ratio)
        except ValueError as e:  # e.g. literal <|image_pad|> typed into the text
            raise SkipSample("token_mismatch", str(e)) from None
        targets = np.append(input_ids[1:], np.int32(self.ids["pad"])).astype(np.int32)
        loss_mask = np.append(in_reply[1:], False).astype(np.float32)
        return Sample(input_ids, targets, loss_mask, positions[:, 0].astype(np.int32), image_pixels, image_grid,
                      video_pixels, video_grid)


# ------------------------------------------------------------------------------------------------ JSONL

def _resolve(path: Any, base: str) -> Any:
    if isinstance(path, str) and not os.path.isabs(path) and "://" not in path:
        return os.path.join(base, path)
    return path


class JsonlSource:
    """Random-access LLaVA/ShareGPT records from a JSONL file (or a JSON array file), paths resolved against the
    file's directory (or `image_root`). Lines are parsed on access: a malformed line is a counted skip."""

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"JSONL file not found: {self.path!r}")
        self.root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(self.path))
        with open(self.path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):  # LLaVA's own files are one JSON array (e.g. llava_v1_5_mix665k.json)
                self.lines = json.load(f)
                if not isinstance(self.lines, list):
                    raise ValueError(f"{self.path!r}: expected a JSON array of records or JSON lines")
            else:
                self.lines = [line for line in f if line.strip()]
        if not self.lines:
            raise ValueError(f"JSONL file {self.path!r} has no records")

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> dict:
        try:
            raw = self.lines[index]
            raw = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as e:
            raise SkipSample("bad_record", f"{self.path} line {index + 1}: {e}") from None
        if not isinstance(raw, dict):
            raise SkipSample("bad_record", f"{self.path} line {index + 1}: not a JSON object")
        images = raw.get("images", raw.get("image"))
        images = [] if images is None else images if isinstance(images, list) else [images]
        if "videos" in raw:
            videos = raw["videos"] if isinstance(raw["videos"], list) else [raw["videos"]]
        else:
            videos = [] if raw.get("video") is None else [raw["video"]]  # a list here = one video's frames
        record = {k: v for k, v in raw.items() if k not in ("image", "images", "video", "videos")}
        record["images"] = [_resolve(p, self.root) for p in images]
        record["videos"] = [[_resolve(p, self.root) for p in v] if isinstance(v, list) else _resolve(v, self.root)
                            for v in videos]
        return record

    def __repr__(self):
        return f"JsonlSource({self.path!r}, {len(self)} records)"
