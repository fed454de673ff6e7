"""The prompt string must be byte-identical to the reference: one stray token shifts every position after it.

Expected strings come from transformers 5.24 (its Jinja renderer with the official Qwen3-VL Instruct template and
Qwen3VLProcessor's own expansion code), frozen by tests/fixtures/make_positions_fixtures.py; when jinja2 is
importable the template is also rendered live.
"""
import json
import os
import re

import numpy as np
import pytest

from qwen3vl.data import chat
from qwen3vl.data.chat import (
    IMAGE_PAD,
    VIDEO_PAD,
    VIDEO_PLACEHOLDER,
    VISION_END,
    VISION_START,
    build_prompt,
    expand_vision_placeholders,
    render_chat,
    video_timestamps,
)
from qwen3vl.model.positions import get_rope_index

HERE = os.path.dirname(os.path.abspath(__file__))
FIXDIR = os.path.join(HERE, "fixtures", "positions")
with open(os.path.join(FIXDIR, "chat_cases.json"), encoding="utf-8") as f:
    DATA = json.load(f)
RENDER = {c["name"]: c for c in DATA["render"]}
EXPAND = DATA["expand"][0]


@pytest.mark.parametrize("name", sorted(RENDER))
def test_render_matches_hf_template(name):
    c = RENDER[name]
    got = render_chat(c["messages"], c["gen"], tools=c.get("tools"), add_vision_id=bool(c.get("vision_id")))
    assert got == c["rendered"]


def test_special_token_ids():
    assert chat.SPECIAL_TOKENS == {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
        "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
    }


def test_no_default_system_message():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert render_chat(msgs, add_generation_prompt=True) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_spec_448_image_example():
    # spec section 8: a 448x448 image -> grid (1, 28, 28) -> 196 pads
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    got = build_prompt(msgs, image_grid_thw=[[1, 28, 28]])
    assert got == ("<|im_start|>user\n<|vision_start|>" + IMAGE_PAD * 196
                   + "<|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n")


def test_video_timestamps_match_hf():
    for idx, fps, want in zip(EXPAND["frames_indices"], EXPAND["fps"], EXPAND["timestamps"]):
        assert video_timestamps(idx, fps) == want
    assert video_timestamps([0, 48], None) == [1.0]  # fps unknown -> 24, as HF


def _stamps():
    return [video_timestamps(i, f) for i, f in zip(EXPAND["frames_indices"], EXPAND["fps"])]


def test_expand_keep_wrapper_matches_transformers5():
    assert render_chat(EXPAND["messages"], True) == EXPAND["rendered"]
    got = expand_vision_placeholders(EXPAND["rendered"], EXPAND["image_grid_thw"], np.array(EXPAND["video_grid_thw"]),
                                     _stamps(), keep_video_wrapper=True)
    assert got == EXPAND["expanded_keep_wrapper"]


def test_expand_wholesale_video_default():
    # original Qwen3-VL processor / spec layout: the wrapped placeholder is replaced by the timestamped blocks
    text = "<|im_start|>user\n" + VIDEO_PLACEHOLDER + "Hi<|im_end|>\n"
    got = expand_vision_placeholders(text, video_grid_thw=[[2, 4, 6]], video_timestamps=[[0.25, 1.25]])
    block = VISION_START + VIDEO_PAD * 6 + VISION_END
    assert got == "<|im_start|>user\n<0.2 seconds>" + block + "<1.2 seconds>" + block + "Hi<|im_end|>\n"
    # a bare <|video_pad|> (vLLM-style prompt) is expanded the same way
    assert expand_vision_placeholders(VIDEO_PAD, video_grid_thw=[[1, 2, 2]], video_timestamps=[[3.04]]) == (
        "<3.0 seconds>" + VISION_START + VIDEO_PAD + VISION_END)


def test_wholesale_equals_hf5_without_outer_wrapper():
    got = expand_vision_placeholders(EXPAND["rendered"], EXPAND["image_grid_thw"], EXPAND["video_grid_thw"], _stamps())
    hf = EXPAND["expanded_keep_wrapper"]
    # drop HF5's outer wrapper: a vision_start directly before a timestamp is always the outer one (inner blocks
    # start after their timestamp), and the outer vision_end is the second of a doubled pair
    stripped = re.sub(re.escape(VISION_START) + r"(?=<\d+\.\d seconds>)", "", hf)
    stripped = stripped.replace(VISION_END + VISION_END, VISION_END)
    assert got == stripped
    assert hf.count(VISION_START) == got.count(VISION_START) + 2


def test_image_expansion_and_grid_order():
    text = "a" + IMAGE_PAD + "b" + IMAGE_PAD
    assert expand_vision_placeholders(text, [[1, 4, 6], [2, 2, 4]]) == "a" + IMAGE_PAD * 6 + "b" + IMAGE_PAD * 4
    # a batch consumes grids across prompts in order
    assert expand_vision_placeholders([IMAGE_PAD, "x", IMAGE_PAD], [[1, 2, 2], [1, 4, 4]]) == [
        IMAGE_PAD, "x", IMAGE_PAD * 4]


def test_expand_errors_name_counts():
    with pytest.raises(ValueError, match="2 image placeholders .* 1 image grids"):
        expand_vision_placeholders(IMAGE_PAD * 2, [[1, 2, 2]])
    with pytest.raises(ValueError, match="1 video placeholders .* 0 video grids"):
        expand_vision_placeholders(VIDEO_PLACEHOLDER)
    with pytest.raises(ValueError, match="video_timestamps are required"):
        expand_vision_placeholders(VIDEO_PLACEHOLDER, video_grid_thw=[[1, 2, 2]])
    with pytest.raises(ValueError, match="3 temporal patches but 2 timestamps"):
        expand_vision_placeholders(VIDEO_PLACEHOLDER, video_grid_thw=[[3, 2, 2]], video_timestamps=[[0.0, 1.0]])


def _fake_tokenize(text):
    """Special tokens -> their ids, every other character -> one id: enough to check placeholder bookkeeping."""
    pat = "(" + "|".join(re.escape(t) for t in chat.SPECIAL_TOKENS) + ")"
    ids = []
    for piece in re.split(pat, text):
        ids += [chat.SPECIAL_TOKENS[piece]] if piece in chat.SPECIAL_TOKENS else [ord(ch) % 1000 for ch in piece]
    return np.array([ids])


@pytest.mark.parametrize("keep", [False, True])
def test_prompt_feeds_rope_index(keep):
    text = build_prompt(EXPAND["messages"], EXPAND["image_grid_thw"], EXPAND["video_grid_thw"], _stamps(),
                        keep_video_wrapper=keep)
    ids = _fake_tokenize(text)
    pos, delta = get_rope_index(ids, EXPAND["image_grid_thw"], EXPAND["video_grid_thw"])
    assert pos.shape == (3, 1, ids.shape[1]) and delta[0, 0] < 0


def test_live_jinja_template():
    jinja2 = pytest.importorskip("jinja2")
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    with open(os.path.join(FIXDIR, "qwen3vl_instruct_chat_template.jinja"), encoding="utf-8") as f:
        src = f.read()
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, **k: json.dumps(x, ensure_ascii=False)
    tmpl = env.from_string(src)
    cases = [(c["messages"], c["gen"], c.get("tools"), bool(c.get("vision_id"))) for c in RENDER.values()]
    cases += [
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "late"},
          {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "ü\n"}]}], True, None, True),
        ([{"role": "tool", "content": "first"}, {"role": "assistant", "content": "x",
          "tool_calls": [{"function": {"name": "f", "arguments": {"a": [1, 2]}}}]}], False, None, False),
    ]
    for msgs, gen, tools, vid in cases:
        want = tmpl.render(messages=msgs, add_generation_prompt=gen, tools=tools, add_vision_id=vid)
        assert render_chat(msgs, gen, tools=tools, add_vision_id=vid) == want
