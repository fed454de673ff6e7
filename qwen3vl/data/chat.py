"""Qwen3-VL Instruct chat format and vision-placeholder expansion, without jinja2 or transformers.

Why a hand-written renderer: the library must not depend on transformers, and the official chat template
is small enough to reproduce exactly. `render_chat` is byte-identical to the Jinja template shipped with
Qwen3-VL-*-Instruct (`chat_template.json`, 5292 bytes, sha256 3636d0f0...; copy in
tests/fixtures/positions/) as rendered by transformers (trim_blocks, lstrip_blocks); tests check this.

Format: no default system message (unlike Qwen2-VL); each turn is `<|im_start|>role\\n...<|im_end|>\\n`; user
items render image -> `<|vision_start|><|image_pad|><|vision_end|>`, video ->
`<|vision_start|><|video_pad|><|vision_end|>`, text -> the text; `add_generation_prompt` appends
`<|im_start|>assistant\\n`. Tools, assistant tool calls and tool responses follow the template too.

`expand_vision_placeholders` then turns the single pads into the per-grid token runs the model expects
(Qwen3VLProcessor). Videos: one timestamped block per temporal patch,
`<{ts:.1f} seconds><|vision_start|>` + (h*w/m^2) x `<|video_pad|>` + `<|vision_end|>`, where ts is the mean
time of the two frames merged into that patch (`video_timestamps`).

Two video layouts exist in the reference code:
* keep_video_wrapper=False (default): the whole `<|vision_start|><|video_pad|><|vision_end|>` is replaced by
  the blocks. This is the original Qwen3-VL processor (transformers 4.57, written with the Qwen team), the
  layout in the spec and the one vLLM produces.
* keep_video_wrapper=True: only `<|video_pad|>` is replaced, so the template's outer vision_start/vision_end
  stay around the blocks: `<|vision_start|><0.5 seconds><|vision_start|>...<|vision_end|>...<|vision_end|>`.
  This is what transformers >= 5 (checked: 5.24) produces, via the generic ProcessorMixin replacement.
Images are the same in both: each `<|image_pad|>` becomes N = t*h*w/m^2 pads.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping, Sequence

from qwen3vl.model.token_merge import frame_tokens

# Special tokens of the Qwen3-VL tokenizer (spec section 8).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"  # unused by Qwen3-VL
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
VISION_PAD_ID = 151654
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656

SPECIAL_TOKENS = {
    ENDOFTEXT: ENDOFTEXT_ID,
    IM_START: IM_START_ID,
    IM_END: IM_END_ID,
    VISION_START: VISION_START_ID,
    VISION_END: VISION_END_ID,
    VISION_PAD: VISION_PAD_ID,
    IMAGE_PAD: IMAGE_PAD_ID,
    VIDEO_PAD: VIDEO_PAD_ID,
}

IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END

__all__ = [
    "render_chat",
    "expand_vision_placeholders",
    "build_prompt",
    "video_timestamps",
    "SPECIAL_TOKENS",
    "IMAGE_PLACEHOLDER",
    "VIDEO_PLACEHOLDER",
]

_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n"
)


def _tojson(x: Any) -> str:
    # transformers' `tojson` filter: json.dumps(ensure_ascii=False), default separators, no sorting.
    return json.dumps(x, ensure_ascii=False)


def _s(x: Any) -> str:
    # Jinja prints values with str(); None prints as "None".
    return x if isinstance(x, str) else str(x)


def _is_image(item: Mapping) -> bool:
    return item.get("type") == "image" or "image" in item or "image_url" in item


def _is_video(item: Mapping) -> bool:
    return item.get("type") == "video" or "video" in item


def _items(content: Any) -> Iterable[Mapping]:
    if content is None:  # lenient: Jinja would fail iterating None
        return ()
    for item in content:
        if not isinstance(item, Mapping):
            raise TypeError(f"content items must be dicts, got {type(item).__name__}: {item!r}")
    return content


def _text_only(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(_s(item["text"]) for item in _items(content) if "text" in item)


def _vision_content(content: Any, counts: dict, add_vision_id: bool) -> str:
    if isinstance(content, str):
        return content
    out = []
    for item in _items(content):
        if _is_image(item):
            counts["image"] += 1
            out.append((f"Picture {counts['image']}: " if add_vision_id else "") + IMAGE_PLACEHOLDER)
        elif _is_video(item):
            counts["video"] += 1
            out.append((f"Video {counts['video']}: " if add_vision_id else "") + VIDEO_PLACEHOLDER)
        elif "text" in item:
            out.append(_s(item["text"]))
    return "".join(out)


def _truthy(x: Any) -> bool:
    return bool(x)


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_vision_id: bool = False,
) -> str:
    """Render HF-style messages with the Qwen3-VL Instruct chat template (single vision placeholders).

    messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str | [items]}]; user/tool items are
    {"type": "image"} (or any dict with an "image"/"image_url" key), {"type": "video"} (or a "video" key) or
    {"type": "text", "text": ...}. Assistant messages may carry "tool_calls". As in the template, only a
    *leading* system message is rendered, and system/assistant content keeps text items only.
    """
    messages = list(messages)
    out = []
    first_is_system = bool(messages) and messages[0].get("role") == "system"
    if tools:
        out.append(IM_START + "system\n")
        if first_is_system:
            out.append(_text_only(messages[0].get("content")) + "\n\n")
        out.append(_TOOLS_HEADER)
        for tool in tools:
            out.append("\n" + _tojson(tool))
        out.append(_TOOLS_FOOTER)
    elif first_is_system:
        out.append(IM_START + "system\n" + _text_only(messages[0].get("content")) + IM_END + "\n")

    counts = {"image": 0, "video": 0}
    n = len(messages)
    for i, msg in enumerate(messages):
        role = msg.get("role")
        content = msg.get("content")
        if role == "user":
            out.append(IM_START + "user\n" + _vision_content(content, counts, add_vision_id) + IM_END + "\n")
        elif role == "assistant":
            out.append(IM_START + "assistant\n" + _text_only(content))
            for k, call in enumerate(msg.get("tool_calls") or ()):
                if (k == 0 and _truthy(content)) or k > 0:
                    out.append("\n")
                if call.get("function"):
                    call = call["function"]
                args = call.get("arguments")
                args = args if isinstance(args, str) else _tojson(args)
                out.append('<tool_call>\n{"name": "' + _s(call.get("name", "")) + '", "arguments": ' + args + "}\n</tool_call>")
            out.append(IM_END + "\n")
        elif role == "tool":
            if i == 0 or messages[i - 1].get("role") != "tool":
                out.append(IM_START + "user")
            out.append("\n<tool_response>\n" + _vision_content(content, counts, add_vision_id) + "\n</tool_response>")
            if i == n - 1 or messages[i + 1].get("role") != "tool":
                out.append(IM_END + "\n")
        # other roles (incl. a non-leading system message) render nothing, as in the template
    if add_generation_prompt:
        out.append(IM_START + "assistant\n")
    return "".join(out)


def video_timestamps(frames_indices: Sequence[int], fps: float | None, temporal_patch_size: int = 2) -> list[float]:
    """Seconds of each temporal patch: mean time of its first and last frame (Qwen3VLProcessor).

    frames_indices are the sampled frame indices in the source video, fps its frame rate (None -> 24, as
    HF). The index list is padded with its last entry to a multiple of temporal_patch_size, like the frames.
    """
    fps = 24 if fps is None else fps
    idx = [int(i) for i in frames_indices]
    if not idx:
        return []
    if len(idx) % temporal_patch_size:
        idx.extend(idx[-1] for _ in range(temporal_patch_size - len(idx) % temporal_patch_size))
    ts = [i / fps for i in idx]
    return [(ts[i] + ts[i + temporal_patch_size - 1]) / 2 for i in range(0, len(ts), temporal_patch_size)]


def _grid_rows(grid, name) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    rows = [tuple(int(v) for v in row) for row in (grid.tolist() if hasattr(grid, "tolist") else grid)]
    for r in rows:
        if len(r) != 3:
            raise ValueError(f"{name} rows must be (t, h, w), got {r}")
    return rows


def _image_replacement(grid, m, ratio):
    t, h, w = grid
    return IMAGE_PAD * (t * frame_tokens(h * w // (m * m), ratio))


def _video_replacement(grid, stamps, m, k, ratio):
    t, h, w = grid
    stamps = list(stamps)
    if len(stamps) != t:
        raise ValueError(f"video {k}: grid {grid} has {t} temporal patches but {len(stamps)} timestamps were given")
    block = VISION_START + VIDEO_PAD * frame_tokens(h * w // (m * m), ratio) + VISION_END
    return "".join(f"<{float(ts):.1f} seconds>" + block for ts in stamps)


_WRAPPED_VIDEO = re.escape(VIDEO_PLACEHOLDER)
_IMAGE_RE = re.escape(IMAGE_PAD)
_VIDEO_RE = re.escape(VIDEO_PAD)


def expand_vision_placeholders(
    text: str | Sequence[str],
    image_grid_thw=None,
    video_grid_thw=None,
    video_timestamps: Sequence[Sequence[float]] | None = None,
    merge_size: int = 2,
    *,
    keep_video_wrapper: bool = False,
    token_ratio: float = 1.0,
):
    """Expand single image/video placeholders into per-grid token runs (Qwen3VLProcessor semantics).

    text: a prompt from `render_chat` (or a list of prompts; grids are then consumed across the list in order,
      as the HF processor does for a batch).
    image_grid_thw / video_grid_thw: [N, 3] patch grids (t, h, w) in prompt order.
    video_timestamps: per video, one float (seconds) per temporal patch, e.g. from `video_timestamps(...)`.
    keep_video_wrapper: False = replace the wrapped video placeholder wholesale (original Qwen processor);
      True = replace only `<|video_pad|>` (transformers >= 5). See the module docstring.
    token_ratio: < 1 with vision-token merging: each frame takes `token_merge.frame_tokens` pads.
    Raises ValueError when placeholder counts, grids or timestamps disagree (the counts are named).
    """
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    m = int(merge_size)
    images = _grid_rows(image_grid_thw, "image_grid_thw")
    videos = _grid_rows(video_grid_thw, "video_grid_thw")
    if keep_video_wrapper:
        pattern = re.compile(f"(?P<image>{_IMAGE_RE})|(?P<video>{_VIDEO_RE})")
    else:
        pattern = re.compile(f"(?P<video>{_WRAPPED_VIDEO})|(?P<image>{_IMAGE_RE})|(?P<bare_video>{_VIDEO_RE})")

    found = {"image": 0, "video": 0}
    for t in texts:
        for mt in pattern.finditer(t):
            found["image" if mt.lastgroup == "image" else "video"] += 1
    if found["image"] != len(images):
        raise ValueError(f"found {found['image']} image placeholders in the text but {len(images)} image grids")
    if found["video"] != len(videos):
        raise ValueError(f"found {found['video']} video placeholders in the text but {len(videos)} video grids")
    if videos:
        if video_timestamps is None:
            raise ValueError("video_timestamps are required to expand videos (see video_timestamps())")
        video_timestamps = list(video_timestamps)
        if len(video_timestamps) != len(videos):
            raise ValueError(f"{len(videos)} video grids but {len(video_timestamps)} timestamp lists")

    it = {"image": 0, "video": 0}

    def repl(mt: re.Match) -> str:
        if mt.lastgroup == "image":
            k = it["image"]
            it["image"] += 1
            return _image_replacement(images[k], m, token_ratio)
        k = it["video"]
        it["video"] += 1
        return _video_replacement(videos[k], video_timestamps[k], m, k, token_ratio)

    out = [pattern.sub(repl, t) for t in texts]
    return out[0] if single else out


def build_prompt(
    messages: Sequence[Mapping[str, Any]],
    image_grid_thw=None,
    video_grid_thw=None,
    video_timestamps: Sequence[Sequence[float]] | None = None,
    *,
    add_generation_prompt: bool = True,
    merge_size: int = 2,
    keep_video_wrapper: bool = False,
    tools=None,
    add_vision_id: bool = False,
    token_ratio: float = 1.0,
) -> str:
    """render_chat + expand_vision_placeholders: the full prompt string to tokenize."""
    text = render_chat(messages, add_generation_prompt, tools=tools, add_vision_id=add_vision_id)
    return expand_vision_placeholders(
        text, image_grid_thw, video_grid_thw, video_timestamps, merge_size, keep_video_wrapper=keep_video_wrapper,
        token_ratio=token_ratio,
    )
