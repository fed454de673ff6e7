"""Tests for qwen3vl/data/image.py and qwen3vl/data/video.py: bit-exact parity with Hugging Face's processors.

References (see tests/fixtures/make_preprocessing_fixtures.py for how they were produced, transformers 5.24):
* images: HF ``Qwen2VLImageProcessorPil`` itself with Qwen3-VL settings, on the committed PNGs;
* videos: HF's real ``Qwen3VLVideoProcessor`` code, with its three torchvision calls (resize, normalize,
  grayscale_to_rgb) supplied by a shim transcribed from torchvision's CPU code (torchvision is not installed in the
  reference environment): uint8 bicubic resize = torch's native ``interpolate(antialias=True)`` on the uint8 tensor.
Fixtures are compared with exact equality (max abs difference 0). When torch and transformers are importable the
``live`` tests also run HF on fresh inputs (random noise images / clips of many sizes); they are skipped in CI.
"""
import importlib
import json
import os
import sys

import numpy as np
import PIL.Image
import pytest

from qwen3vl.data.image import ImageLoadError, ImageProcessor, load_image, patchify, smart_resize
from qwen3vl.data.video import VideoProcessor, resize_uint8_antialias, timestamp_strings, video_smart_resize

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures", "preprocessing")
with open(os.path.join(FIX, "manifest.json")) as _f:
    MANIFEST = json.load(_f)
HF = np.load(os.path.join(FIX, "hf_outputs.npz"))
PATCH_AREA = 16 * 16


def _png(name):
    return np.asarray(PIL.Image.open(os.path.join(FIX, name)))


def _hf_pixels(levels, table, still_image):
    """Stored uint8 levels -> HF's float32 pixel_values (the fixture script asserted this is bit-exact)."""
    if still_image:  # stored temporal slice 0 only; slice 1 is identical for a still image
        n = levels.shape[0]
        levels = np.repeat(levels.reshape(n, 3, 1, PATCH_AREA), 2, axis=2).reshape(n, -1)
    chan = np.arange(levels.shape[1]) // (2 * PATCH_AREA)
    return table[chan[None, :], levels]


def _image_processor(size):
    return ImageProcessor(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])


def _video_frames(name):
    t, h, w = MANIFEST["videos"][name]["thw"]
    return _png(f"{name}_frames.png").reshape(t, h, w, 3)


def _video_processor(name):
    return VideoProcessor.from_dict(MANIFEST["videos"][name]["kwargs"])


# ------------------------------------------------------------------------------------------------ smart_resize
# Spec §7.1 table: input (h, w) -> resized (h, w), grid_thw, pixel rows, LLM tokens.
SPEC_TABLE = [
    ((448, 448), (448, 448), (1, 28, 28), 784, 196),
    ((100, 100), (256, 256), (1, 16, 16), 256, 64),
    ((480, 640), (480, 640), (1, 30, 40), 1200, 300),
    ((1080, 1920), (1088, 1920), (1, 68, 120), 8160, 2040),
    ((4032, 3024), (4032, 3008), (1, 252, 188), 47376, 11844),
    ((5000, 5000), (4096, 4096), (1, 256, 256), 65536, 16384),
]


@pytest.mark.parametrize("hw,resized,grid,rows,tokens", SPEC_TABLE)
def test_smart_resize_spec_table(hw, resized, grid, rows, tokens):
    assert smart_resize(*hw) == resized
    proc = ImageProcessor()
    assert proc.grid_thw(*hw) == grid
    assert int(np.prod(grid)) == rows
    assert proc.num_tokens(*hw) == tokens


def test_smart_resize_rounds_ties_to_even():
    # 80/32 = 2.5 -> 2 and 112/32 = 3.5 -> 4 (Python round); round-half-up would give (96, 128).
    assert smart_resize(80, 112, min_pixels=1) == (64, 128)


def test_aspect_ratio_over_200_raises():
    with pytest.raises(ValueError, match=r"10x2010"):
        smart_resize(10, 2010)
    assert smart_resize(10, 2000, min_pixels=1)  # exactly 200 is allowed
    with pytest.raises(ValueError, match=r"aspect ratio"):
        video_smart_resize(4, 40, 8100)


# ------------------------------------------------------------------------------------------------ loading errors
def test_corrupt_image_file_raises_value_error_naming_path(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a png" * 10)
    with pytest.raises(ValueError, match="not_an_image.png"):
        ImageProcessor()(str(bad))
    good = open(os.path.join(FIX, "sq100.png"), "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"))


def test_bad_array_input_raises():
    with pytest.raises(ValueError, match="uint8"):
        ImageProcessor()(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(64, 64, 5\)"):
        ImageProcessor()(np.zeros((64, 64, 5), np.uint8))


# ------------------------------------------------------------------------------------------------ row order
def test_rows_are_merge_window_major_with_cthw_vectors():
    """A 64x128 image needs no resize (min_pixels lowered): compare against a by-hand patch walk (spec §2.1)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    proc = ImageProcessor(min_pixels=32 * 32)
    pv, grid = proc(img)
    assert grid.tolist() == [[1, 4, 8]] and pv.shape == (32, 1536) and pv.dtype == np.float32
    norm = ((img.astype(np.float64) / 255).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    expected = []
    for br in range(2):
        for bc in range(4):
            for ir in range(2):
                for ic in range(2):
                    r, c = 2 * br + ir, 2 * bc + ic
                    patch = norm[16 * r:16 * r + 16, 16 * c:16 * c + 16, :]  # (y, x, ch)
                    vec = np.stack([patch.transpose(2, 0, 1)] * 2, axis=1)  # (ch, t, y, x)
                    expected.append(vec.reshape(-1))
    np.testing.assert_array_equal(pv, np.stack(expected))


def test_video_rows_are_time_major_and_pad_last_frame():
    """Five distinct 64x64 frames (no resize): temporal patch k holds frames 2k, 2k+1; the 6th repeats the 5th."""
    frames = np.stack([np.full((64, 64, 3), 40 * i, np.uint8) for i in range(5)])
    proc = VideoProcessor(min_pixels=1, do_sample_frames=False)
    out = proc(frames, video_fps=1.0)
    assert out.video_grid_thw.tolist() == [[3, 4, 4]]
    vals = out.pixel_values_videos.reshape(3, 16, 3, 2, PATCH_AREA)  # (gt, rows, c, t, yx)
    level = np.round((vals * 0.5 + 0.5) * 255).astype(int)
    for k in range(3):
        for t in range(2):
            assert np.all(level[k, :, :, t] == 40 * min(2 * k + t, 4))
    assert out.timestamps == [[0.5, 2.5, 4.0]]


def test_patchify_rejects_unaligned_sizes():
    with pytest.raises(ValueError, match="multiple of"):
        patchify(np.zeros((1, 3, 48, 64), np.float32), 16, 2, 2)


# ------------------------------------------------------------------------------------------------ HF fixtures: images
IMAGE_RUNS = [(name, run) for name, case in MANIFEST["images"].items() for run in case["runs"]]


@pytest.mark.parametrize("name,run", IMAGE_RUNS)
def test_image_matches_hf_fixture(name, run):
    case = MANIFEST["images"][name]
    path = os.path.join(FIX, f"{name}.png")
    inp = path if run == "path" else PIL.Image.open(path)
    pv, grid = _image_processor(case["size"])(inp)
    ref = _hf_pixels(_png(f"hf_{name}_{run}.png"), HF[f"image/{name}/table"], still_image=True)
    np.testing.assert_array_equal(grid, HF[f"image/{name}/{run}/grid"])
    assert pv.dtype == np.float32 and grid.dtype == np.int64
    assert pv.shape == ref.shape
    assert np.abs(pv - ref).max() == 0.0


def test_image_batch_and_input_forms_agree():
    size = MANIFEST["images"]["sq100"]["size"]
    proc = _image_processor(size)
    names = ["sq100", "thin37x250", "tall300x77"]
    paths = [os.path.join(FIX, f"{n}.png") for n in names]
    pv, grid = proc(paths)
    singles = [proc(p) for p in paths]
    np.testing.assert_array_equal(pv, np.concatenate([s[0] for s in singles]))
    np.testing.assert_array_equal(grid, np.concatenate([s[1] for s in singles]))
    arr = np.asarray(PIL.Image.open(paths[0]).convert("RGB"))
    np.testing.assert_array_equal(proc(arr)[0], singles[0][0])
    np.testing.assert_array_equal(proc(PIL.Image.fromarray(arr))[0], singles[0][0])


# ------------------------------------------------------------------------------------------------ HF fixtures: videos
@pytest.mark.parametrize("name", list(MANIFEST["videos"]))
def test_video_matches_hf_fixture(name):
    case = MANIFEST["videos"][name]
    proc = _video_processor(name)
    frames = _video_frames(name)
    out = proc(list(frames), video_fps=case["video_fps"])
    ref = _hf_pixels(_png(f"hf_{name}.png"), HF[f"video/{name}/table"], still_image=False)
    np.testing.assert_array_equal(out.video_grid_thw, HF[f"video/{name}/grid"])
    np.testing.assert_array_equal(proc.sample_frame_indices(len(frames), case["video_fps"]),
                                  HF[f"video/{name}/indices"])
    assert out.timestamps == [HF[f"video/{name}/timestamps"].tolist()]
    assert out.pixel_values_videos.shape == ref.shape
    assert np.abs(out.pixel_values_videos - ref).max() == 0.0


def test_timestamp_strings():
    proc = _video_processor("clip9x64x80")
    out = proc(_video_frames("clip9x64x80"), video_fps=4.0)
    assert timestamp_strings(out.timestamps[0]) == ["<0.4 seconds>", "<1.6 seconds>"]


def test_video_input_forms_agree(tmp_path):
    """Frames as PIL list, array list, 4-D array, frame directory and GIF give the same result; batches concat."""
    proc = _video_processor("clip9x64x80")
    frames = _video_frames("clip9x64x80") // 64 * 64  # 4 levels per channel: a GIF palette holds them exactly
    ref = proc(frames, video_fps=4.0)
    for form in (list(frames), [PIL.Image.fromarray(f) for f in frames]):
        got = proc(form, video_fps=4.0)
        np.testing.assert_array_equal(got.pixel_values_videos, ref.pixel_values_videos)
    frame_dir = tmp_path / "frames"
    frame_dir.mkdir()
    for i, f in enumerate(frames):  # natural sort: frame_2 before frame_10
        PIL.Image.fromarray(f).save(frame_dir / f"frame_{i}.png")
    got = proc(str(frame_dir), video_fps=4.0)
    np.testing.assert_array_equal(got.pixel_values_videos, ref.pixel_values_videos)
    gif = tmp_path / "clip.gif"
    pil = [PIL.Image.fromarray(f) for f in frames]
    pil[0].save(gif, save_all=True, append_images=pil[1:], duration=250, loop=0)
    got = proc(str(gif))  # 250 ms per frame -> 4 fps read from the file
    np.testing.assert_array_equal(got.pixel_values_videos, ref.pixel_values_videos)
    assert got.timestamps == ref.timestamps
    both = proc([frames, list(frames[:5])], video_fps=[4.0, 2.0])
    second = proc(list(frames[:5]), video_fps=2.0)
    np.testing.assert_array_equal(both.pixel_values_videos,
                                  np.concatenate([ref.pixel_values_videos, second.pixel_values_videos]))
    assert both.timestamps == ref.timestamps + second.timestamps


def test_video_errors_and_fps_default():
    proc = VideoProcessor(min_pixels=4096)
    with pytest.raises(ValueError, match="at least temporal_patch_size"):
        proc([np.zeros((64, 64, 3), np.uint8)], video_fps=2.0)
    with pytest.raises(ValueError, match="frames differ in size"):
        proc([np.zeros((64, 64, 3), np.uint8), np.zeros((64, 32, 3), np.uint8)], video_fps=2.0)
    with pytest.warns(UserWarning, match="assuming 24"):
        out = proc(np.zeros((48, 64, 64, 3), np.uint8))  # 48 frames at 24 fps -> 4 frames
    assert out.video_grid_thw.tolist() == [[2, 4, 4]]


# ------------------------------------------------------------------------------------------------ configs
def test_from_pretrained_reads_configs(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 1024, "longest_edge": 2048}, "patch_size": 16, "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}))
    p = ImageProcessor.from_pretrained(tmp_path)
    assert (p.min_pixels, p.max_pixels) == (1024, 2048)
    legacy = ImageProcessor.from_dict({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14})
    assert (legacy.min_pixels, legacy.max_pixels, legacy.patch_size) == (3136, 12845056, 14)
    # no video config: HF falls back to preprocessor_config.json (the image settings)
    v = VideoProcessor.from_pretrained(tmp_path)
    assert (v.min_pixels, v.max_pixels, v.fps) == (1024, 2048, 2.0)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 4096, "longest_edge": 25165824}, "fps": 2, "min_frames": 4, "max_frames": 768}))
    v = VideoProcessor.from_pretrained(tmp_path)
    assert (v.min_pixels, v.max_pixels) == (4096, 25165824)
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "image_processor": {"size": {"shortest_edge": 65536, "longest_edge": 16777216}},
        "video_processor": {"size": {"shortest_edge": 8192, "longest_edge": 65536}}}))
    assert ImageProcessor.from_pretrained(tmp_path).min_pixels == 65536
    assert VideoProcessor.from_pretrained(tmp_path).min_pixels == 8192
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(empty)
    assert VideoProcessor.from_pretrained(empty) == VideoProcessor()
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessor(min_pixels=10, max_pixels=5)


# ------------------------------------------------------------------------------------------------ live HF (optional)
def _reference():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(HERE, "fixtures"))
    try:
        return importlib.import_module("make_preprocessing_fixtures")
    finally:
        sys.path.pop(0)


LIVE_IMAGE_SIZES = [(100, 100), (37, 250), (480, 640), (300, 77), (250, 330), (33, 1000), (701, 523), (64, 64)]


@pytest.mark.parametrize("hw", LIVE_IMAGE_SIZES)
def test_live_images_match_hf(hw):
    ref = _reference()
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    img = rng.integers(0, 256, hw + (3,), dtype=np.uint8)  # noise: worst case for any resize mismatch
    rgba = np.concatenate([img, rng.integers(0, 256, hw + (1,), dtype=np.uint8)], -1)
    size = {"shortest_edge": 65536, "longest_edge": 128 * 32 * 32 * 4}
    proc = _image_processor(size)
    for inp in (img, PIL.Image.fromarray(img), rgba, PIL.Image.fromarray(rgba, "RGBA")):
        pv_ref, grid_ref = ref.hf_images(inp, size)
        pv, grid = proc(inp)
        np.testing.assert_array_equal(grid, grid_ref)
        assert np.abs(pv - pv_ref).max() == 0.0


@pytest.mark.parametrize("fixture_case", list(MANIFEST["images"]))
def test_live_image_fixtures_still_match_hf(fixture_case):
    ref = _reference()
    size = MANIFEST["images"][fixture_case]["size"]
    path = os.path.join(FIX, f"{fixture_case}.png")
    pv_ref, _ = ref.hf_images(path, size)
    assert np.abs(_image_processor(size)(path)[0] - pv_ref).max() == 0.0


LIVE_VIDEOS = [  # (T, H, W, video fps, size) incl. noise, mixed up/down resize, odd counts, long sampling
    (9, 64, 80, 4.0, {"shortest_edge": 4096, "longest_edge": 25165824}),
    (31, 90, 50, 10.0, {"shortest_edge": 4096, "longest_edge": 25165824}),
    (7, 250, 330, 3.0, {"shortest_edge": 4096, "longest_edge": 200000}),
    (3, 20, 40, 1.0, {"shortest_edge": 131072, "longest_edge": 786432}),
]


@pytest.mark.parametrize("case", LIVE_VIDEOS)
def test_live_videos_match_hf(case):
    ref = _reference()
    t, h, w, fps, size = case
    frames = np.random.default_rng(t * h).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    pv_ref, grid_ref, idx_ref, ts_ref = ref.hf_video(frames, fps, size=size)
    out = VideoProcessor.from_dict({"size": size})(frames, video_fps=fps)
    np.testing.assert_array_equal(out.video_grid_thw, grid_ref)
    assert out.timestamps == [ts_ref.tolist()]
    assert np.abs(out.pixel_values_videos - pv_ref).max() == 0.0


def test_live_uint8_resize_matches_torch():
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w, oh, ow = (int(v) for v in rng.integers(3, 300, 4))
        x = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        for resample, mode in ((3, "bicubic"), (2, "bilinear")):
            want = torch.nn.functional.interpolate(t, size=[oh, ow], mode=mode, align_corners=False,
                                                   antialias=True).permute(0, 2, 3, 1).numpy()
            np.testing.assert_array_equal(resize_uint8_antialias(x, oh, ow, resample), want)
