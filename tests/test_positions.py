"""MRoPE position ids must equal HF transformers 5.24 exactly: any drift silently degrades every multimodal answer.

Fixtures come from tests/fixtures/make_positions_fixtures.py (HF's own get_rope_index and generate); when torch +
transformers are importable the comparison also runs live on fresh random cases.
"""
import importlib.util
import os
import time

import numpy as np
import pytest

from qwen3vl.model.positions import decode_positions, get_rope_index, split_video_grids, text_positions

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures", "positions", "rope_index.npz")
IM_START, IM_END, VS, VE, IMG, VID = 151644, 151645, 151652, 151653, 151655, 151656


def _load():
    with np.load(FIX) as z:
        data = {k: z[k] for k in z.files}
    cases = {}
    for key, v in data.items():
        name, field = key.split("/")
        cases.setdefault(name, {})[field] = v
    return cases


CASES = _load()
ROPE_CASES = sorted(k for k in CASES if k != "generate")


def _run(c, **kw):
    mask = c["attention_mask"] if bool(c["has_mask"]) else None
    return get_rope_index(c["input_ids"], c["image_grid_thw"], c["video_grid_thw"], mask, **kw)


@pytest.mark.parametrize("name", ROPE_CASES)
def test_matches_hf_fixture(name):
    c = CASES[name]
    pos, delta = _run(c)
    assert pos.shape == c["position_ids"].shape and pos.dtype == np.int64
    np.testing.assert_array_equal(pos, c["position_ids"])
    np.testing.assert_array_equal(delta, c["rope_deltas"])


def test_fixture_covers_required_cases():
    need = {"text_left_pad", "two_images", "video_3_patches", "mixed_batch_left_pad", "spec_example"}
    assert need <= set(ROPE_CASES)
    c = CASES["mixed_batch_left_pad"]
    assert c["input_ids"].shape[0] == 3 and (c["attention_mask"] == 0).any()
    assert len(CASES["video_3_patches"]["video_grid_thw"]) == 1 and CASES["video_3_patches"]["video_grid_thw"][0, 0] == 3


def test_explicit_mm_token_type_ids_equal_derived():
    c = CASES["many_random_left_pad"]
    ids = c["input_ids"]
    types = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
    pos, delta = _run(c, mm_token_type_ids=types)
    np.testing.assert_array_equal(pos, c["position_ids"])
    np.testing.assert_array_equal(delta, c["rope_deltas"])


def test_padding_positions_are_zero_and_deltas_use_unpadded_length():
    # HF 5.24: padding -> 0 (v4.57 used 1); delta = max + 1 - (#unpadded tokens), v4.57 used the padded length.
    for name in ("text_left_pad", "mixed_batch_left_pad", "mixed_batch_right_pad"):
        c = CASES[name]
        pos, delta = _run(c)
        mask = c["attention_mask"]
        assert (pos[:, mask == 0] == 0).all()
        for b in range(mask.shape[0]):
            assert delta[b, 0] == pos[:, b].max() + 1 - mask[b].sum()


def test_spec_worked_example():
    ids = np.array([[IM_START, 872, 198, VS] + [IMG] * 6 + [VE, 13048, IM_END]])
    pos, delta = get_rope_index(ids, image_grid_thw=[[1, 4, 6]])
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9])
    np.testing.assert_array_equal(pos[1, 0], [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9])
    np.testing.assert_array_equal(pos[2, 0], [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9])
    assert delta.tolist() == [[-3]]
    assert decode_positions(13, delta).tolist() == [[[10]], [[10]], [[10]]]
    # 1-D input is accepted as one row
    pos1, _ = get_rope_index(ids[0], image_grid_thw=[[1, 4, 6]])
    np.testing.assert_array_equal(pos1, pos)


def test_text_only_is_cumsum_positions():
    c = CASES["text_left_pad"]
    pos, delta = _run(c)
    tp = text_positions(c["attention_mask"])
    for axis in range(3):
        np.testing.assert_array_equal(pos[axis], tp)
    assert (delta == 0).all()
    assert text_positions([[0, 0, 1, 1, 1]]).tolist() == [[0, 0, 0, 1, 2]]
    # no mask, no grids: plain arange
    pos2, d2 = get_rope_index(np.arange(5)[None])
    assert pos2[0].tolist() == [[0, 1, 2, 3, 4]] and d2.tolist() == [[0]]


def test_split_video_grids():
    assert split_video_grids([[3, 4, 6], [1, 2, 2]]).tolist() == [[1, 4, 6]] * 3 + [[1, 2, 2]]
    assert split_video_grids(None).shape == (0, 3)


def test_count_mismatch_errors_name_counts():
    ids = np.array([[1, VS] + [IMG] * 5 + [VE, 2]])
    with pytest.raises(ValueError, match=r"5 image pad tokens.*need 6"):
        get_rope_index(ids, image_grid_thw=[[1, 4, 6]])
    with pytest.raises(ValueError, match=r"image placeholder mismatch: input_ids hold 5 .* need 0"):
        get_rope_index(ids)
    vids = np.array([[1, VS] + [VID] * 4 + [VE, 3, VS] + [VID] * 4 + [VE]])
    with pytest.raises(ValueError, match=r"8 video pad tokens.*need 12"):
        get_rope_index(vids, video_grid_thw=[[3, 4, 4]])
    get_rope_index(vids, video_grid_thw=[[2, 4, 4]])  # ok


def test_run_not_matching_one_grid_errors():
    # two images with no separator: totals agree but one run would have to cover two grids (HF crashes here)
    ids = np.array([[1, VS] + [IMG] * 12 + [VE]])
    with pytest.raises(ValueError, match=r"run of 12 image pad tokens"):
        get_rope_index(ids, image_grid_thw=[[1, 4, 6], [1, 4, 6]])
    # a video given as one block for T=2 (Qwen2-VL layout) is rejected too
    ids = np.array([[1, VS] + [VID] * 8 + [VE]])
    with pytest.raises(ValueError, match=r"run of 8 video pad tokens"):
        get_rope_index(ids, video_grid_thw=[[2, 4, 4]])


def test_masked_pad_tokens_are_ignored():
    # an image token under attention_mask 0 is padding, not a placeholder (HF drops masked tokens first)
    ids = np.array([[IMG, 5, VS] + [IMG] * 6 + [VE]])
    mask = np.array([[0, 1, 1] + [1] * 6 + [1]])
    pos, delta = get_rope_index(ids, [[1, 4, 6]], attention_mask=mask)
    assert pos[:, 0, 0].tolist() == [0, 0, 0]
    assert pos[0, 0, 1:].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 5]


def test_decode_positions_match_hf_generate():
    g = CASES["generate"]
    ids, mask, prefill, decode = g["ids"], g["mask"], g["prefill"], g["decode"]
    pos, delta = get_rope_index(ids, g["images"], None, mask)
    np.testing.assert_array_equal(pos, prefill[1:])
    np.testing.assert_array_equal(text_positions(mask), prefill[0])
    L, n = ids.shape[1], decode.shape[-1]
    np.testing.assert_array_equal(decode_positions(L, delta, n, attention_mask=mask), decode)
    # per-row slots, one step at a time
    for k in range(n):
        step = decode_positions(np.full(len(ids), L + k), delta, attention_mask=mask)
        np.testing.assert_array_equal(step[..., 0], decode[..., k])
    # equivalent: continue after each row's max position
    np.testing.assert_array_equal(decode[0, :, 0], pos.max(axis=(0, 2)) + 1)


def test_long_sequence_is_fast():
    # 64 videos x 8 temporal patches (512 blocks) + 32 images in one ~90k-token row
    rng = np.random.default_rng(0)
    toks, im, vd = [], [], []
    for i in range(96):
        toks += rng.integers(0, 1000, 7).tolist()
        if i % 3 == 0:
            im.append([1, 20, 28])
            toks += [VS] + [IMG] * 140 + [VE]
        else:
            vd.append([8, 12, 16])
            for _ in range(8):
                toks += [33, 34, 35, VS] + [VID] * 48 + [VE]
    ids = np.array([toks, toks])
    t0 = time.perf_counter()
    pos, delta = get_rope_index(ids, im + im, vd + vd)
    dt = time.perf_counter() - t0
    assert pos.shape == (3, 2, len(toks)) and delta[0, 0] == delta[1, 0]
    assert dt < 3.0, dt


def _hf_module():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    path = os.path.join(HERE, "fixtures", "make_positions_fixtures.py")
    spec = importlib.util.spec_from_file_location("make_positions_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_live_against_transformers(seed):
    mod = _hf_module()
    rng = np.random.default_rng(seed)
    head = [("tok", [IM_START, 872, 198])]
    rows = []
    for _ in range(3):
        segs = list(head)
        for _ in range(int(rng.integers(0, 4))):
            if rng.random() < 0.5:
                segs.append(("image", (1, 2 * int(rng.integers(1, 8)), 2 * int(rng.integers(1, 8)))))
            else:
                segs.append(("video", (int(rng.integers(1, 4)), 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5))),
                             bool(rng.integers(0, 2))))
            segs.append(("text", int(rng.integers(1, 6))))
        rows.append(segs)
    for padding in ("left", "right"):
        ids, mask, im, vd = mod.build_case(rng, rows, padding)
        want_pos, want_delta = mod.hf_get_rope_index(ids, im, vd, mask)
        pos, delta = get_rope_index(ids, im, vd, mask)
        np.testing.assert_array_equal(pos, want_pos)
        np.testing.assert_array_equal(delta, want_delta)
