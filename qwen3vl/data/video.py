"""Qwen3-VL video preprocessing, equal to Hugging Face's ``Qwen3VLVideoProcessor`` (spec §7.2).

HF's video processor is torch/torchvision-only. Its CPU path is reproduced here with numpy:

* frame sampling: ``n = int(total / video_fps * fps)`` clamped to [min_frames, max_frames] and <= total, indices
  ``round(linspace(0, total - 1, n))`` (numpy round, ties to even);
* whole-clip ``smart_resize`` (temporal factor 2, sides < 32 first scaled up);
* resize: torchvision ``resize(antialias=True)`` on a uint8 tensor runs torch's native uint8 antialiased kernel
  (``_upsample_bicubic2d_aa``: Pillow's ``ImagingResample`` with int16 weights at a per-pass precision). It is NOT
  ``PIL.Image.resize``: on random-noise frames that differs by 1-2 levels on ~1% of pixels, and by up to ~24 levels
  on ~30% of pixels where one axis grows and the other shrinks. So the kernel is ported, bit-exact, in
  ``resize_uint8_antialias`` (checked against torch on ~200 sizes). HF with ``device="cuda"`` resizes in float
  instead; we follow the default CPU path. Throughput is ~0.15 s per 720p frame on 2 cores (numpy-bound);
* fused rescale+normalise ``(x - 255*mean) / (255*std)`` in float32, the torchvision backend's order;
* temporal padding to a multiple of 2 by repeating the last frame, patchify as images;
* one timestamp per temporal patch: mean of the two frames' ``index / video_fps`` (HF ``_calculate_timestamps``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from typing import Any, NamedTuple, Sequence

import numpy as np
import PIL.Image
import PIL.ImageSequence

from qwen3vl.data.image import (MAX_ASPECT_RATIO, ImageLoadError, _array_to_rgb, _composite_on_white,
                                _size_from_config, load_image, patchify, read_processor_config)

DEFAULT_VIDEO_MIN_PIXELS = 128 * 32 * 32  # class default of Qwen3VLVideoProcessor (shipped configs: 4096)
DEFAULT_VIDEO_MAX_PIXELS = 768 * 32 * 32  # class default (shipped configs: 25165824)
ASSUMED_VIDEO_FPS = 24.0  # what HF assumes (with a warning) when the source fps is unknown
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def video_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = DEFAULT_VIDEO_MIN_PIXELS, max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS
                       ) -> tuple[int, int]:
    """HF's video ``smart_resize``: the pixel budget covers the whole clip (t * h * w), not one frame."""
    if num_frames < temporal_factor:
        raise ValueError(f"video has {num_frames} frame(s) after sampling; at least temporal_patch_size = "
                         f"{temporal_factor} are needed (HF raises here too)")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"video frames of size {height}x{width} (HxW) have aspect ratio {ratio:.1f}; "
                         f"the absolute aspect ratio must be at most {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---------------------------------------------------------------------------------------------------------------
# torch's uint8 antialiased resize (aten/src/ATen/native/cpu/UpSampleKernel.cpp), ported to numpy.

def _cubic_filter(x: float) -> float:
    """Keys cubic with a = -0.5 (the antialias=True constant, same as Pillow), torch's exact expression order."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _linear_filter(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


_FILTERS = {2: (_linear_filter, 2), 3: (_cubic_filter, 4)}  # PIL resample id -> (filter, interp_size)


def _aa_int16_weights(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per output index: source indices [out, K], int16-valued weights [out, K] (0 for padding), precision.

    Mirrors ``_compute_indices_min_size_weights_aa`` + ``_compute_index_ranges_int16_weights`` in double.
    """
    filter_fn, interp_size = _FILTERS[resample]
    scale = in_size / out_size
    support = (interp_size * 0.5) * scale if scale >= 1.0 else interp_size * 0.5
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    k_max = int(math.ceil(support)) * 2 + 1
    xmins = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, k_max), np.float64)
    wt_max = 0.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(max(min(int(center + support + 0.5), in_size) - xmin, 0), k_max)
        w = [filter_fn((j + xmin - center + 0.5) * invscale) for j in range(xsize)]
        total = 0.0
        for v in w:
            total += v
        if total != 0.0:
            w = [v / total for v in w]
            wt_max = max([wt_max] + w)
        xmins[i] = xmin
        weights[i, :xsize] = w
    precision = 0
    while precision < 22:
        if int(0.5 + wt_max * (1 << (precision + 1))) >= (1 << 15):
            break
        precision += 1
    scaled = weights * (1 << precision)
    int_weights = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    idx = np.minimum(xmins[:, None] + np.arange(k_max)[None, :], in_size - 1)  # padded taps have weight 0
    return idx, int_weights, precision


def _resample_rows(x: np.ndarray, out_size: int, resample: int) -> np.ndarray:
    """One separable pass over axis -2 of a uint8 (..., H, W) array, integer arithmetic, uint8 result.

    Each output row sums K = 2*ceil(support)+1 gathered input rows times their int16 weights plus the rounding
    offset, then ``>> precision`` and clamp, as torch does. Gathering whole contiguous rows keeps numpy fast.
    """
    idx, w, precision = _aa_int16_weights(x.shape[-2], out_size, resample)
    out_shape = x.shape[:-2] + (out_size, x.shape[-1])
    acc = np.full(out_shape, 1 << (precision - 1), np.int32)
    taps = np.empty(out_shape, np.uint8)
    prod = np.empty(out_shape, np.int32)
    for k in range(idx.shape[1]):
        np.take(x, idx[:, k], axis=-2, out=taps)
        np.multiply(taps, w[:, k, None], out=prod)
        acc += prod
    np.right_shift(acc, precision, out=acc)
    np.clip(acc, 0, 255, out=acc)
    return acc.astype(np.uint8)


def _resize_chw(frames: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """(T, C, H, W) uint8 -> (T, C, height, width): width pass first (kept as uint8), then height, as torch (and
    Pillow) do; a pass is skipped when that side does not change. The width pass runs on the transposed array so
    both passes gather contiguous rows."""
    if frames.shape[-1] != width:
        swapped = np.ascontiguousarray(frames.swapaxes(-1, -2))
        frames = np.ascontiguousarray(_resample_rows(swapped, width, resample).swapaxes(-1, -2))
    if frames.shape[-2] != height:
        frames = _resample_rows(frames, height, resample)
    return frames


def resize_uint8_antialias(frames: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """(T, H, W, C) uint8 -> (T, height, width, C) uint8, equal to torchvision ``resize(antialias=True)`` on CPU.

    Only bilinear (2) and bicubic (3) exist in torch's native uint8 kernel.
    """
    if resample not in _FILTERS:
        raise ValueError(f"video resample must be 2 (bilinear) or 3 (bicubic), got {resample!r}")
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"expected (T, H, W, C) uint8 frames, got {frames.dtype} {frames.shape}")
    chw = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))
    return _resize_chw(chw, height, width, resample).transpose(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------------------------
# Loading.

def _natural_key(name: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def _frame_to_rgb(frame: Any, where: str) -> np.ndarray:
    if isinstance(frame, PIL.Image.Image):
        return np.asarray(_composite_on_white(frame))
    if isinstance(frame, np.ndarray):
        try:
            return _array_to_rgb(frame)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if isinstance(frame, (str, os.PathLike)):
        return np.asarray(load_image(frame))
    raise TypeError(f"{where}: unsupported frame type {type(frame).__name__}")


def load_gif(path: str | os.PathLike) -> tuple[list[np.ndarray], float | None]:
    """All frames of an animated GIF (RGB uint8) and its fps from the frame durations (None if absent)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path!r}")
    try:
        with PIL.Image.open(path) as im:
            frames, durations = [], []
            for frame in PIL.ImageSequence.Iterator(im):
                durations.append(frame.info.get("duration") or 0)
                frames.append(np.asarray(_composite_on_white(frame)))
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"cannot read video file {path!r}: {type(e).__name__}: {e}") from e
    total_ms = float(sum(durations))
    fps = len(frames) * 1000.0 / total_ms if total_ms > 0 else None
    return frames, fps


class _Video:
    """A clip whose frames are decoded on demand (a frame directory decodes only the sampled frames)."""

    def __init__(self, frames: Sequence[Any], fps: float | None, name: str):
        self.frames, self.fps, self.name = frames, fps, name

    def __len__(self):
        return len(self.frames)

    def decode(self, indices: Sequence[int]) -> np.ndarray:
        out = [_frame_to_rgb(self.frames[i], f"{self.name} frame {i}") for i in indices]
        shapes = {f.shape for f in out}
        if len(shapes) != 1:
            raise ValueError(f"{self.name}: frames differ in size {sorted(shapes)}; all frames must match")
        return np.stack(out)


def _as_video(video: Any, fps: float | None, name: str) -> _Video:
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if os.path.isdir(path):
            files = sorted((f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS)), key=_natural_key)
            if not files:
                raise ValueError(f"frame directory {path!r} contains no image files {FRAME_EXTENSIONS}")
            return _Video([os.path.join(path, f) for f in files], fps, path)
        frames, gif_fps = load_gif(path)
        return _Video(frames, fps if fps is not None else gif_fps, path)
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"{name}: a video array must be (T, H, W, C) uint8, got shape {video.shape}")
        return _Video(list(video), fps, name)
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError(f"{name}: empty list of frames")
        return _Video(list(video), fps, name)
    raise TypeError(f"{name}: unsupported video input of type {type(video).__name__}")


def _is_single_video(videos: Any) -> bool:
    if isinstance(videos, (str, os.PathLike)):
        return True
    if isinstance(videos, np.ndarray):
        return videos.ndim == 4
    if isinstance(videos, (list, tuple)) and videos:
        first = videos[0]
        return isinstance(first, PIL.Image.Image) or (isinstance(first, np.ndarray) and first.ndim in (2, 3))
    return False


# ---------------------------------------------------------------------------------------------------------------

class VideoFeatures(NamedTuple):
    pixel_values_videos: np.ndarray  # float32 [sum_i t_i*h_i*w_i, 3*tp*p*p]
    video_grid_thw: np.ndarray  # int64 [n_videos, 3]
    timestamps: list[list[float]]  # per video, one (seconds) per temporal patch


def timestamp_strings(timestamps: Sequence[float]) -> list[str]:
    """The prompt text of each temporal patch: ``<%.1f seconds>`` (spec §8)."""
    return [f"<{t:.1f} seconds>" for t in timestamps]


@dataclasses.dataclass(frozen=True)
class VideoProcessor:
    """Qwen3-VL video processor (HF ``Qwen3VLVideoProcessor``). Defaults are the class defaults; shipped
    ``video_preprocessor_config.json`` files set min/max pixels 4096 / 25165824 (use ``from_pretrained``)."""
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_VIDEO_MIN_PIXELS
    max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    do_sample_frames: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3  # bicubic
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    cap_pixels_per_frame: bool = False  # HF's current default (it warns it will flip to True in v5.22)
    max_video_tokens: int = 768

    def __post_init__(self):
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels",
                     "min_frames", "max_frames"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"VideoProcessor.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.fps <= 0:
            raise ValueError(f"VideoProcessor.fps must be positive, got {self.fps!r}")
        if self.resample not in _FILTERS:
            raise ValueError(f"VideoProcessor.resample must be 2 (bilinear) or 3 (bicubic), got {self.resample!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or any(s == 0 for s in self.image_std):
            raise ValueError(f"VideoProcessor.image_mean/image_std must be 3 values (std non-zero), got "
                             f"{self.image_mean!r} / {self.image_std!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "VideoProcessor":
        lo, hi = _size_from_config(d, DEFAULT_VIDEO_MIN_PIXELS, DEFAULT_VIDEO_MAX_PIXELS)
        keys = ("patch_size", "temporal_patch_size", "merge_size", "fps", "min_frames", "max_frames",
                "do_sample_frames", "image_mean", "image_std", "rescale_factor", "resample", "do_resize",
                "do_rescale", "do_normalize", "cap_pixels_per_frame", "max_video_tokens")
        return cls(min_pixels=lo, max_pixels=hi, **{k: d[k] for k in keys if d.get(k) is not None})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "VideoProcessor":
        """HF's lookup order: ``processor_config.json["video_processor"]``, ``video_preprocessor_config.json``,
        then ``preprocessor_config.json`` (the image settings); class defaults if none exists."""
        cfg = read_processor_config(directory, "video_processor",
                                    ["video_preprocessor_config.json", "preprocessor_config.json"])
        return cls() if cfg is None else cls.from_dict(cfg)

    def sample_frame_indices(self, total_frames: int, video_fps: float) -> np.ndarray:
        """HF ``Qwen3VLVideoProcessor.sample_frames`` with fps sampling."""
        n = int(total_frames / video_fps * self.fps)
        n = min(max(n, self.min_frames), self.max_frames, total_frames)
        return np.linspace(0, total_frames - 1, n).round().astype(int)

    def timestamps(self, indices: Sequence[int], video_fps: float) -> list[float]:
        """Seconds per temporal patch: indices padded (last repeated) to a multiple of temporal_patch_size,
        divided by video_fps, averaged over the first and last frame of each patch (HF ``_calculate_timestamps``)."""
        idx = [int(i) for i in indices]
        tp = self.temporal_patch_size
        if len(idx) % tp:
            idx.extend(idx[-1] for _ in range(tp - len(idx) % tp))
        ts = [i / video_fps for i in idx]
        return [(ts[i] + ts[i + tp - 1]) / 2 for i in range(0, len(ts), tp)]

    def target_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """Resized (height, width) for a clip of ``num_frames`` sampled frames (HF ``resize``)."""
        factor = self.patch_size * self.merge_size
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            frame_cap = self.max_video_tokens * factor * factor
            per_frame = max(min(frame_cap, self.max_pixels // num_frames), int(self.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return video_smart_resize(num_frames, height, width, self.temporal_patch_size, factor,
                                  self.min_pixels, max_pixels)

    def normalize(self, frames: np.ndarray) -> np.ndarray:
        """(T, 3, H, W) uint8 -> float32 with the torchvision backend's fused arithmetic:
        (x - mean/rescale_factor) / (std/rescale_factor), mean and std rounded to float32 first."""
        x = frames.astype(np.float32)
        mean = np.array(self.image_mean, np.float32).reshape(3, 1, 1)
        std = np.array(self.image_std, np.float32).reshape(3, 1, 1)
        if self.do_normalize:
            if self.do_rescale:
                scale = np.float32(1.0 / self.rescale_factor)
                mean, std = mean * scale, std * scale
            x -= mean
            x /= std  # a true division, as torch does: multiplying by 1/std is not bit-identical
        elif self.do_rescale:
            x *= np.float32(self.rescale_factor)
        return x

    def preprocess_one(self, video: Any, video_fps: float | None = None, name: str = "video"
                       ) -> tuple[np.ndarray, tuple[int, int, int], list[float]]:
        """One clip -> (rows [gt*gh*gw, 1536], (gt, gh, gw), timestamps per temporal patch)."""
        clip = _as_video(video, video_fps, name)
        fps = clip.fps
        if fps is None:
            warnings.warn(f"{clip.name}: source fps unknown; assuming {ASSUMED_VIDEO_FPS} as HF does. "
                          "Pass video_fps for correct frame sampling and timestamps.", stacklevel=3)
            fps = ASSUMED_VIDEO_FPS
        if fps <= 0:
            raise ValueError(f"{clip.name}: video fps must be positive, got {fps!r}")
        total = len(clip)
        indices = self.sample_frame_indices(total, fps) if self.do_sample_frames else np.arange(total)
        frames = np.ascontiguousarray(clip.decode(indices).transpose(0, 3, 1, 2))  # (T, 3, H, W) uint8
        t, _, h, w = frames.shape
        if self.do_resize:
            rh, rw = self.target_size(t, h, w)
            frames = np.concatenate([_resize_chw(frames[i:i + 8], rh, rw, self.resample) for i in range(0, t, 8)])
        rows, grid = patchify(self.normalize(frames), self.patch_size, self.merge_size, self.temporal_patch_size)
        return rows, grid, self.timestamps(indices, fps)

    def __call__(self, videos: Any, video_fps: float | Sequence[float | None] | None = None) -> VideoFeatures:
        """A video or a list of videos -> ``VideoFeatures(pixel_values_videos, video_grid_thw, timestamps)``.

        A video is a list of frames (PIL images or uint8 HWC arrays), a (T, H, W, C) uint8 array, a directory of
        frame images (natural sort order) or an animated GIF path. ``video_fps`` is the source frame rate (one value
        or one per video); a GIF supplies its own, otherwise 24 is assumed with a warning, like HF.
        """
        batch = [videos] if _is_single_video(videos) else list(videos)
        if not batch:
            raise ValueError("VideoProcessor got an empty list of videos")
        fps_list = list(video_fps) if isinstance(video_fps, (list, tuple)) else [video_fps] * len(batch)
        if len(fps_list) != len(batch):
            raise ValueError(f"got {len(batch)} videos but {len(fps_list)} video_fps values")
        rows, grids, stamps = [], [], []
        for i, (v, f) in enumerate(zip(batch, fps_list)):
            r, g, ts = self.preprocess_one(v, f, name=f"video {i}")
            rows.append(r)
            grids.append(g)
            stamps.append(ts)
        return VideoFeatures(np.concatenate(rows, axis=0), np.asarray(grids, dtype=np.int64), stamps)
