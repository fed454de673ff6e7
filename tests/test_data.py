"""Training data pipeline: tokenizer, synthetic VQA, JSONL samples, packing, resumable loader.

What must hold for training to be correct: loss only on assistant replies (and their <|im_end|>), no target or
attention crossing packed samples, per-sample MRoPE positions, visual patches laid out exactly as the model
scatters them (images in row-major token order, then videos, then padding), bad records counted not fatal, and a
resumed loader replaying the same batches.
"""
import json
import os

import numpy as np
import PIL.Image
import pytest

from qwen3vl.data.datasets import JsonlSource, Sample, SampleBuilder, SkipSample
from qwen3vl.data.loader import Loader
from qwen3vl.data.packing import BATCH_KEYS, Packer, batch_stats, to_model_inputs
from qwen3vl.data.synthetic import COLOURS, Scene, SyntheticSource, draw_scene, make_record, position_of
from qwen3vl.data.tokenizer import Tokenizer
from qwen3vl.data.video import VideoProcessor
from qwen3vl.model.positions import get_rope_index
from qwen3vl.model.vision import vision_geometry

TOK = Tokenizer.builtin()
IDS = TOK.special_ids
PACK_IDS = dict(pad_id=IDS["pad"], image_token_id=IDS["image_token_id"], video_token_id=IDS["video_token_id"])
NPE = 256  # tiny model's num_position_embeddings


def _builder(max_length=256, **kw):
    return SampleBuilder(TOK, max_length=max_length, min_pixels=1024, max_pixels=64 * 64,
                         video_processor=VideoProcessor(min_pixels=1024, max_pixels=4 * 64 * 64), **kw)


# ------------------------------------------------------------------------------------------------ tokenizer

def test_builtin_tokenizer_round_trip_and_special_tokens(tmp_path):
    assert (TOK.num_tokens, TOK.vocab_size) == (512, 512)
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
             "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    assert [TOK.token_id(n) for n in names] == list(range(256, 264))
    assert IDS == {"image_token_id": 262, "video_token_id": 263, "vision_start_token_id": 259,
                   "vision_end_token_id": 260, "im_start": 257, "im_end": 258, "eos": 258, "pad": 256}
    rng = np.random.default_rng(0)
    texts = ["", "hello world", "  tabs\tand\nnewlines\r\n", "héllo wörld ß ø 日本語 🙂👍🏽 ∑ Ω",
             "".join(chr(c) for c in rng.integers(32, 0x2FFF, 300) if not 0xD800 <= c < 0xE000)]
    for t in texts:
        ids = TOK.encode(t)
        assert TOK.decode(ids) == t and not set(ids) & set(range(256, 264))  # no text becomes a special token
        assert len(ids) <= len(t.encode("utf-8"))
    assert TOK.encode("\x00\xff") == [0, 195, 191]  # id b is byte b (UTF-8 of U+00FF is C3 BF)
    question = TOK.encode("How many squares are there?")
    assert len(question) == 6 and TOK.decode(question[2:3]) == " squares"  # merges make words single tokens
    t = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi é<|im_end|>\n"
    ids = TOK.encode(t)
    assert ids[0] == 257 and TOK.decode(ids[1:2]) == "user" and 262 in ids and ids.count(258) == 1
    assert TOK.decode(ids) == t
    assert TOK.decode(ids, skip_special_tokens=True) == "user\nHi é\n"
    TOK.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path)
    assert again.encode(t) == ids and again.special_ids == IDS
    with pytest.raises(KeyError):
        TOK.token_id("<think>")


def test_builtin_tokenizer_file_layout():
    # The file is the truth at run time; `make_builtin_tokenizer --check` compares it with a rebuild, which may
    # order merges differently under another `tokenizers` release, so CI checks the layout instead.
    from qwen3vl.data.tokenizer import BUILTIN_PATH, QWEN_SPECIAL_TOKENS, byte_table
    spec = json.load(open(BUILTIN_PATH, encoding="utf-8"))
    vocab, table = spec["model"]["vocab"], byte_table()
    assert len(vocab) == 512 and sorted(vocab.values()) == list(range(512))
    assert all(vocab[table[b]] == b for b in range(256))
    assert [vocab[t] for t in QWEN_SPECIAL_TOKENS] == list(range(256, 264))
    for merge in spec["model"]["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        assert a in vocab and b in vocab and a + b in vocab


# ------------------------------------------------------------------------------------------------ synthetic

def test_synthetic_is_deterministic_and_splits_differ():
    a, b = make_record("train", 7), make_record("train", 7)
    assert np.array_equal(np.asarray(a["images"][0]), np.asarray(b["images"][0]))
    assert a["conversations"] == b["conversations"]
    ev = make_record("eval", 7)
    assert not np.array_equal(np.asarray(a["images"][0]), np.asarray(ev["images"][0]))
    assert not np.array_equal(np.asarray(a["images"][0]), np.asarray(make_record("train", 7, seed=1)["images"][0]))
    src = SyntheticSource("eval", 10, image_size=96)
    assert len(src) == 10 and src[3]["images"][0].size == (96, 96)


def test_synthetic_drawing_hand_checked():
    # Known parameters: the centre pixel has the shape's colour, a far corner the background.
    for shape in ("circle", "square", "triangle"):
        scene = Scene(shape, "blue", ((20, 40),), 8, background=250)
        px = np.asarray(draw_scene(scene, 64))
        assert tuple(px[40, 20]) == COLOURS["blue"]
        assert tuple(px[0, 63]) == (250, 250, 250)
    assert position_of(Scene("circle", "red", ((10, 33),), 6), 64) == "left"
    assert position_of(Scene("circle", "red", ((33, 54),), 6), 64) == "bottom"


def test_synthetic_answers_match_pixels():
    kinds = set()
    for i in range(64):
        r = make_record("train", i)
        meta, px = r["meta"], np.asarray(r["images"][0])
        scene = Scene(**{**meta["scene"], "centres": tuple(map(tuple, meta["scene"]["centres"]))})
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert q.startswith("<image>\n") and a == meta["answer"] and " " not in a
        for x, y in scene.centres:  # every shape is visible, in its colour
            assert tuple(px[y, x]) == COLOURS[scene.colour]
        colour_pixels = np.all(px == COLOURS[scene.colour], axis=-1)
        assert colour_pixels.sum() >= len(scene.centres) * scene.radius ** 2  # nothing hidden
        expected = {"colour": scene.colour, "shape": scene.shape, "count": str(len(scene.centres)),
                    "position": position_of(scene, 64) if len(scene.centres) == 1 else None}[meta["kind"]]
        assert a == expected
        if meta["kind"] != "count":
            assert len(scene.centres) == 1
        if meta["kind"] in ("count", "position", "colour"):
            assert scene.shape in q
        kinds.add(meta["kind"])
        # pixels outside the shapes are background
        assert (~colour_pixels).sum() == np.all(px == scene.background, axis=-1).sum()
    assert kinds == {"colour", "shape", "count", "position"}


# ------------------------------------------------------------------------------------------------ JSONL

def _png(path, colour, size=(64, 64)):
    PIL.Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def jsonl(tmp_path):
    _png(tmp_path / "a.png", (255, 0, 0))
    os.makedirs(tmp_path / "imgs")
    _png(tmp_path / "imgs" / "b.png", (0, 0, 255), (96, 64))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    frames = [PIL.Image.new("RGB", (64, 64), (i * 60, 0, 0)) for i in range(4)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=500, loop=0)
    long_q = "why? " * 100
    records = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                             {"from": "gpt", "value": "red"}]},
        {"image": ["a.png", "imgs/b.png"], "conversations": [
            {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "Red, blue."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes é."}]},
        {"image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                   {"from": "gpt", "value": "x"}]},
        {"image": "corrupt.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                   {"from": "gpt", "value": "x"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image><image> two markers"},
                                             {"from": "gpt", "value": "x"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": long_q}, {"from": "gpt", "value": "x"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nno reply"}]},
        {"images": ["imgs/b.png"], "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "blue"}]},
        {"image": "imgs/b.png", "conversations": [{"from": "human", "value": "No marker here."},
                                                  {"from": "gpt", "value": "ok"}]},
        {"video": "clip.gif", "image": "a.png", "conversations": [
            {"from": "human", "value": "<video>\n<image>\nSame?"}, {"from": "gpt", "value": "no"}]},
    ]
    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps(r) + "\n")
            if i == 3:
                f.write("{not json\n\n")
    return path


def test_jsonl_samples_and_skips(jsonl):
    src = JsonlSource(jsonl)
    assert len(src) == 11
    assert src[0]["images"] == [str(jsonl.parent / "a.png")]
    builder = _builder(max_length=200)
    reasons = {}
    for i in range(len(src)):
        try:
            builder(src[i])
        except SkipSample as e:
            reasons[i] = e.reason
    assert reasons == {2: "missing_image", 3: "corrupt_image", 4: "bad_record", 5: "token_mismatch",
                       6: "too_long", 7: "no_targets"}

    # Marker-less images go to the start of the first user turn; "\n" after a marker is dropped.
    s = builder(src[9])
    text = TOK.decode(s.input_ids)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert "<|vision_end|>No marker here.<|im_end|>" in text
    assert "<|vision_end|>What colour?" in TOK.decode(builder(src[0]).input_ids)
    # Video: one timestamped block per temporal patch (GIF at 2 fps -> 4 frames -> 2 patches).
    s = builder(src[10])
    text = TOK.decode(s.input_ids)
    assert s.video_grid_thw.tolist() == [[2, 4, 4]] and s.image_grid_thw.tolist() == [[1, 4, 4]]
    assert text.count("<|video_pad|>") == 8 and "<0.2 seconds><|vision_start|>" in text
    assert "<1.2 seconds><|vision_start|>" in text
    assert text.index("<|video_pad|>") < text.index("<|image_pad|>")


def test_json_array_file_and_frame_videos(tmp_path):
    os.makedirs(tmp_path / "frames")
    for i in range(4):
        _png(tmp_path / "frames" / f"f{i}.png", (0, i * 60, 0))
    conv = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "It turns green."}]
    records = [{"video": [f"frames/f{i}.png" for i in range(4)], "fps": 2, "conversations": conv},
               {"video": "frames", "video_fps": 1.0, "conversations": conv}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    src, builder = JsonlSource(tmp_path / "data.json"), _builder()
    assert len(src) == 2 and src[0]["videos"][0][0] == str(tmp_path / "frames" / "f0.png")
    a, b = builder(src[0]), builder(src[1])
    assert a.video_grid_thw.tolist() == b.video_grid_thw.tolist() == [[2, 4, 4]]
    assert np.array_equal(a.video_pixels, b.video_pixels)
    assert "<0.2 seconds>" in TOK.decode(a.input_ids) and "<0.5 seconds>" in TOK.decode(b.input_ids)


def test_loss_mask_covers_exactly_the_replies(jsonl):
    src, builder = JsonlSource(jsonl), _builder()
    for i, replies in ((0, ["red"]), (1, ["Red, blue.", "Yes é."]), (8, ["blue"]), (10, ["no"])):
        s = builder(src[i])
        assert np.array_equal(s.targets[:-1], s.input_ids[1:]) and s.loss_mask[-1] == 0
        m = s.loss_mask.astype(bool)
        assert TOK.decode(s.targets[m]) == "".join(r + "<|im_end|>" for r in replies)
        # each reply is one contiguous run that ends on <|im_end|>
        edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(int), [0]])))
        assert len(edges) == 2 * len(replies)
        assert all(s.targets[e - 1] == IDS["im_end"] for e in edges[1::2])
    s = builder(src[8])  # system prompt present, not trained
    assert TOK.decode(s.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_image_tokens_match_patches_and_positions(jsonl):
    src, builder = JsonlSource(jsonl), _builder()
    s = builder(src[1])
    assert s.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 4]]  # 64x64, and 96x64 (w x h) shrunk to 4096 px
    assert (s.input_ids == IDS["image_token_id"]).sum() == s.image_pixels.shape[0] // 4 == 6
    ref, _ = get_rope_index(s.input_ids[None], s.image_grid_thw, image_token_id=IDS["image_token_id"],
                            video_token_id=IDS["video_token_id"])
    assert np.array_equal(s.positions, ref[:, 0])


# ------------------------------------------------------------------------------------------------ packing

def _samples(n=12, seed=0):
    builder, src = _builder(), SyntheticSource("train", 1000, 64, seed)
    return [builder(src[i]) for i in range(n)]


def _video_sample(jsonl):
    return _builder()(JsonlSource(jsonl)[10])


def test_packing_layout(jsonl):
    samples = _samples(9)
    samples.insert(2, _video_sample(jsonl))
    samples.insert(7, _builder()(JsonlSource(jsonl)[1]))
    packer = Packer(batch_size=4, max_length=90, max_patches=1024, **PACK_IDS, num_position_embeddings=NPE)
    batches = packer.pack_all(samples)
    assert len(batches) == 1  # 11 samples, ~20-60 tokens each, fit 4 rows of 90
    b = batches[0]
    assert set(b) == set(BATCH_KEYS)
    B, L, P = 4, 90, 1024
    assert b["input_ids"].shape == (B, L) and b["positions"].shape == (3, B, L)
    assert b["pixel_values"].shape == (P, 1536) and b["vision_pos_index"].shape == (P, 4)
    placed = []  # (row, segment) -> sample, in first-fit order
    for r in range(B):
        seg = b["segment_ids"][r]
        n = seg.max()
        assert n >= 2  # packed
        bounds = np.flatnonzero(np.diff(np.concatenate([seg, [0]])))
        assert np.array_equal(seg[:bounds[-1] + 1], np.repeat(np.arange(1, n + 1), np.diff(np.concatenate(
            [[-1], bounds]))))  # contiguous 1..n, then padding 0
        assert np.all(seg[bounds[-1] + 1:] == 0) and np.all(b["input_ids"][r][seg == 0] == IDS["pad"])
        for j in range(1, n + 1):
            idx = np.flatnonzero(seg == j)
            ids = b["input_ids"][r, idx]
            s = next(s for s in samples if s.length == len(idx) and np.array_equal(s.input_ids, ids))
            placed.append((r, j, s))
            assert np.array_equal(b["positions"][:, r, idx], s.positions)  # restart per sample
            assert b["positions"][:, r, idx[0]].tolist() == [0, 0, 0]
            assert b["loss_mask"][r, idx[-1]] == 0  # no target crosses into the next sample
            assert np.array_equal(b["targets"][r, idx[:-1]], ids[1:])
            # get_rope_index on the packed segment alone gives the batch's positions
            ref, _ = get_rope_index(ids[None], s.image_grid_thw if len(s.image_grid_thw) else None,
                                    s.video_grid_thw if len(s.video_grid_thw) else None,
                                    image_token_id=IDS["image_token_id"], video_token_id=IDS["video_token_id"])
            assert np.array_equal(ref[:, 0], b["positions"][:, r, idx])
    assert sorted(id(s) for _, _, s in placed) == sorted(id(s) for s in samples)
    assert b["loss_mask"][b["segment_ids"] == 0].sum() == 0

    # Vision rows: all images in row-major token order, then all videos, then zero padding.
    order = [s for _, _, s in sorted(placed, key=lambda x: (x[0], x[1]))]
    images = np.concatenate([s.image_pixels for s in order])
    videos = np.concatenate([s.video_pixels for s in order])
    n_img, n_vid = len(images), len(videos)
    assert n_vid == 32 and n_img == 16 * 9 + 16 + 24
    assert np.array_equal(b["pixel_values"][:n_img], images)
    assert np.array_equal(b["pixel_values"][n_img:n_img + n_vid], videos)
    n = n_img + n_vid
    assert not b["pixel_values"][n:].any() and not b["vision_pos_weight"][n:].any()
    assert not b["vision_segment_ids"][n:].any() and b["vision_segment_ids"][:n].min() == 1
    grids = np.concatenate([s.image_grid_thw for s in order] + [s.video_grid_thw for s in order])
    ref = vision_geometry(grids, NPE, 2)
    for got, want in ((b["vision_pos_index"], ref.pos_index), (b["vision_pos_weight"], ref.pos_weight),
                      (b["vision_rowcol"], ref.rowcol), (b["vision_segment_ids"], ref.segment_ids)):
        assert np.array_equal(got[:n], want)
    # Token counts equal merged patch rows, and the model's scatter (cumsum over row-major tokens, videos
    # after images) picks each token's own patches.
    img_tok, vid_tok = b["input_ids"] == IDS["image_token_id"], b["input_ids"] == IDS["video_token_id"]
    assert img_tok.sum() == n_img // 4 and vid_tok.sum() == n_vid // 4
    row = np.where(img_tok, np.cumsum(img_tok.reshape(-1)).reshape(B, L) - 1,
                   np.cumsum(vid_tok.reshape(-1)).reshape(B, L) - 1 + img_tok.sum())
    for r, j, s in placed:
        idx = np.flatnonzero(b["segment_ids"][r] == j)
        for kind, pix in ((IDS["image_token_id"], s.image_pixels), (IDS["video_token_id"], s.video_pixels)):
            rows = row[r, idx][b["input_ids"][r, idx] == kind]
            got = np.concatenate([b["pixel_values"][4 * k:4 * k + 4] for k in rows]) if len(rows) else pix
            assert np.array_equal(got, pix)
    st = batch_stats(b)
    assert st["samples"] == 11 and st["patches"] == n and st["tokens"] == sum(s.length for s in samples)


def test_unpacked_and_budgets():
    samples = _samples(5)
    packer = Packer(batch_size=2, max_length=128, max_patches=48, pack=False, **PACK_IDS,
                    num_position_embeddings=NPE)
    batches = packer.pack_all(samples)
    # one sample per row, 2 rows per batch, but only 3 images (48 patches) per batch
    assert [batch_stats(b)["samples"] for b in batches] == [2, 2, 1]
    assert all(b["segment_ids"].max(axis=1).tolist() in ([1, 1], [1, 0]) for b in batches)
    packer = Packer(batch_size=2, max_length=128, max_patches=32, **PACK_IDS, num_position_embeddings=NPE)
    assert [batch_stats(b)["samples"] for b in packer.pack_all(samples)] == [2, 2, 1]  # patch budget closes
    assert packer.too_big(samples[0]) is None
    assert Packer(2, 16, 32).too_big(samples[0]) == "too_long"
    assert Packer(2, 128, 8).too_big(samples[0]) == "too_many_patches"
    with pytest.raises(ValueError):
        Packer(2, 128, 10)  # not a multiple of merge_size**2
    inputs = to_model_inputs(batches[0])
    assert inputs.pixel_values.shape == (48, 1536) and inputs.vision.segment_ids.shape == (48,)
    assert inputs.positions.shape == (3, 2, 128) and inputs.input_ids.dtype == np.int32
    text_only = Packer(2, 64, 0, pad_id=0).pack_all([Sample(
        np.arange(5, dtype=np.int32), np.arange(1, 6, dtype=np.int32), np.ones(5, np.float32),
        np.zeros((3, 5), np.int32), np.zeros((0, 1536), np.float32), np.zeros((0, 3), np.int64),
        np.zeros((0, 1536), np.float32), np.zeros((0, 3), np.int64))])[0]
    assert to_model_inputs(text_only).pixel_values is None


# ------------------------------------------------------------------------------------------------ loader

def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in BATCH_KEYS)


def test_loader_resume_is_exact():
    src = SyntheticSource("train", 18, 64, seed=3)  # ~5 batches per epoch: resumes cross epochs
    packer = Packer(batch_size=2, max_length=160, max_patches=128, tokenizer=TOK, min_pixels=1024,
                    max_pixels=4096, num_position_embeddings=NPE)
    ref = Loader(src, packer, seed=5, prefetch=0)
    batches, states = [], []
    for _ in range(12):
        batches.append(next(ref))
        states.append(ref.state())
    assert states[-1]["epoch"] >= 2 and json.loads(json.dumps(states[-1])) == states[-1]
    with Loader(src, packer, seed=5, prefetch=3) as threaded:  # same stream with the prefetch thread
        assert all(_same(next(threaded), b) for b in batches)
    for k in (0, 4, 7):
        other = Loader(src, packer, seed=5, prefetch=2)
        next(other)  # the thread has run ahead; restore must discard it
        other.restore(states[k])
        assert all(_same(next(other), b) for b in batches[k + 1:])
        other.close()
    # epochs are reshuffled, and a different seed gives a different order
    first = Loader(src, packer, seed=6, prefetch=0)
    assert not _same(next(first), batches[0])


def test_loader_counts_skips_and_finishes_epochs(jsonl):
    packer = Packer(batch_size=2, max_length=200, max_patches=256, builder=_builder(max_length=200),
                    num_position_embeddings=NPE)
    loader = Loader(JsonlSource(jsonl), packer, seed=0, shuffle=False, epochs=2)
    batches = list(loader)
    assert loader.skipped == {"missing_image": 2, "corrupt_image": 2, "bad_record": 2, "token_mismatch": 2,
                              "too_long": 2, "no_targets": 2}
    assert sum(batch_stats(b)["samples"] for b in batches) == 10  # 5 good records x 2 epochs
    with pytest.raises(StopIteration):
        next(loader)
    # resume mid-way keeps the skip counts and the batches
    again = Loader(JsonlSource(jsonl), packer, seed=0, shuffle=False, epochs=2)
    next(again)
    state = again.state()
    rest = list(again)
    resumed = Loader(JsonlSource(jsonl), packer, seed=0, shuffle=False, epochs=2)
    resumed.restore(state)
    assert resumed.skipped == state["skipped"]
    assert all(_same(x, y) for x, y in zip(list(resumed), rest))
    assert resumed.skipped == loader.skipped


def test_packed_batch_gives_per_sample_logits():
    """End to end with the tiny model: a sample's logits inside a packed batch equal its logits alone
    (segments isolate samples in text and vision attention; patches reach their own tokens)."""
    import dataclasses

    import jax
    from flax import nnx

    from qwen3vl.configs import models
    from qwen3vl.config import ModelConfig
    from qwen3vl.model.vlm import Qwen3VL

    cfg = ModelConfig.from_dict(models.get_config("tiny").to_dict())
    assert (cfg.image_token_id, cfg.video_token_id) == (IDS["image_token_id"], IDS["video_token_id"])
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=1),  # keep it quick
                              vision=dataclasses.replace(cfg.vision, depth=1))
    graphdef, state = nnx.split(Qwen3VL(cfg, rngs=nnx.Rngs(0)))
    forward = jax.jit(lambda state, inputs: nnx.merge(graphdef, state).forward(inputs)[0])
    samples = _samples(5)
    packer = Packer(2, 200, 128, **PACK_IDS, num_position_embeddings=cfg.vision.num_position_embeddings)
    b = packer.pack_all(samples)[0]
    assert batch_stats(b)["samples"] == 5
    packed = np.asarray(forward(state, to_model_inputs(b)))
    for r in range(2):
        for j in range(1, b["segment_ids"][r].max() + 1):
            idx = np.flatnonzero(b["segment_ids"][r] == j)
            s = next(s for s in samples if np.array_equal(s.input_ids, b["input_ids"][r, idx]))
            alone = np.asarray(forward(state, to_model_inputs(packer.pack_all([s])[0])))[0, :s.length]
            np.testing.assert_allclose(packed[r, idx], alone, atol=1e-5)
    # the one-sample batch agrees with the public, unpadded call (last `s`, `alone` of the loop)
    public = nnx.merge(graphdef, state)(s.input_ids[None], pixel_values=s.image_pixels,
                                        image_grid_thw=s.image_grid_thw)
    np.testing.assert_allclose(alone, np.asarray(public[0] if isinstance(public, tuple) else public)[0], atol=1e-5)
