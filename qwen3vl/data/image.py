"""Qwen3-VL image preprocessing, bit-exact with Hugging Face's PIL image processor.

Reference: ``transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil`` (the processor
transformers uses when torchvision is absent) with the Qwen3-VL ``preprocessor_config.json`` (spec §7.1):
smart_resize to multiples of 32, PIL bicubic resize, x/255 in float64 cast to float32, (x - 0.5) / 0.5 in float32,
then patchify into rows of 3*2*16*16 values in merge-window-major order (spec §2.1) with vector order (c, t, y, x).

Only numpy and Pillow are used: the library never imports torch or transformers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps

DEFAULT_MIN_PIXELS = 65536  # Qwen3-VL size["shortest_edge"]: 64 LLM tokens at factor 32.
DEFAULT_MAX_PIXELS = 16777216  # Qwen3-VL size["longest_edge"]: 16384 LLM tokens at factor 32.
MAX_ASPECT_RATIO = 200

ImageLike = Any  # PIL.Image.Image | str | os.PathLike | np.ndarray (uint8, HWC or HW)


class ImageLoadError(ValueError):
    """An image file that exists but cannot be decoded (corrupt, truncated, not an image)."""


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """HF's ``smart_resize``: the (height, width) an image is resized to, both multiples of ``factor``.

    Python's ``round`` (ties to even) is used on purpose: round-half-up ports differ by one 32-px step on exact
    .5 ratios (spec §10.17). Pixel count is pulled into [min_pixels, max_pixels] keeping the aspect ratio close.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"image of size {height}x{width} (HxW) has aspect ratio {ratio:.1f}; "
                         f"the absolute aspect ratio must be at most {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _composite_on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    """HF ``convert_to_rgb`` for PIL inputs: transparency is blended onto white, not dropped."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """HF ``convert_to_rgb`` for numpy inputs (uint8, channels last): grey is repeated, alpha blended on white."""
    if array.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8 (H, W[, C]); got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"numpy images must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
                         f"got {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        composite = alpha * array[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    return array


def load_image(image: ImageLike) -> PIL.Image.Image:
    """Any supported image input -> RGB ``PIL.Image``, the way HF's processor sees it.

    * path: opened, EXIF orientation applied, ``convert("RGB")`` (HF ``load_image``; alpha is dropped, not blended);
    * PIL image: transparency blended onto white (HF ``convert_to_rgb``), no EXIF transpose;
    * numpy uint8 (H, W[, C]) array: grey repeated, RGBA blended onto white.
    A file that exists but cannot be decoded raises ``ImageLoadError`` (a ``ValueError``) naming the path.
    """
    if isinstance(image, PIL.Image.Image):
        return _composite_on_white(image)
    if isinstance(image, np.ndarray):
        return PIL.Image.fromarray(_array_to_rgb(image))
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path!r}")
        try:
            with PIL.Image.open(path) as opened:
                opened.load()  # PIL decodes lazily: force it so corrupt data fails here, with the path.
                return PIL.ImageOps.exif_transpose(opened).convert("RGB")
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
            raise ImageLoadError(f"cannot read image file {path!r}: {type(e).__name__}: {e}") from e
    raise TypeError(f"unsupported image input of type {type(image).__name__}; "
                    "expected a PIL image, a path, or a uint8 numpy array")


def patchify(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
             ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, C, H, W) float32 -> ([gt*gh*gw, C*tp*p*p], (gt, gh, gw)); rows merge-window-major (spec §2.1).

    T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame (a still image becomes two
    identical frames). Vector order (c, t, y, x) matches the flattened Conv3d weight.
    """
    t, c, h, w = frames.shape
    p, m, tp = patch_size, merge_size, temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch_size*merge_size = {p * m}")
    if t % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], tp - t % tp, axis=0)], axis=0)
        t = frames.shape[0]
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, bh, bw, mh, mw, c, tp, py, px)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def _size_from_config(d: dict, min_key_default: int, max_key_default: int) -> tuple[int, int]:
    """min/max pixels from a processor config: ``size`` dict, then legacy top-level keys win (HF ``__init__``)."""
    size = d.get("size") or {}
    if not isinstance(size, dict):
        raise ValueError(f"preprocessor config field 'size' must be a dict, got {size!r}")
    lo = size.get("shortest_edge", size.get("min_pixels", min_key_default))
    hi = size.get("longest_edge", size.get("max_pixels", max_key_default))
    if d.get("min_pixels") is not None:
        lo = d["min_pixels"]
    if d.get("max_pixels") is not None:
        hi = d["max_pixels"]
    return int(lo), int(hi)


def read_processor_config(directory: str | os.PathLike, section: str, filenames: Sequence[str]) -> dict | None:
    """First config found: ``processor_config.json[section]`` (newer HF layout), then each of ``filenames``."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory!r}")
    nested = os.path.join(directory, "processor_config.json")
    if os.path.isfile(nested):
        with open(nested) as f:
            cfg = json.load(f)
        if isinstance(cfg.get(section), dict):
            return cfg[section]
    for name in filenames:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Qwen3-VL image processor; defaults are the shipped ``preprocessor_config.json`` values (spec §7.1).

    ``processor(images)`` -> ``(pixel_values float32 [N, 3*tp*p*p], image_grid_thw int64 [n_images, 3])``,
    equal to HF ``Qwen2VLImageProcessorPil`` for the same settings.
    """
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ImageProcessor.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"ImageProcessor.min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"ImageProcessor.{name} must have 3 values (RGB), got {getattr(self, name)!r}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"ImageProcessor.image_std must be non-zero, got {self.image_std!r}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessor":
        """From a ``preprocessor_config.json`` dict; unknown keys are ignored, missing ones keep Qwen3-VL defaults."""
        lo, hi = _size_from_config(d, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
        kw = {k: d[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                                "rescale_factor", "resample", "do_resize", "do_rescale", "do_normalize")
              if d.get(k) is not None}
        return cls(min_pixels=lo, max_pixels=hi, **kw)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ImageProcessor":
        """Reads ``processor_config.json["image_processor"]`` or ``preprocessor_config.json`` in a checkpoint dir."""
        cfg = read_processor_config(directory, "image_processor", ["preprocessor_config.json"])
        if cfg is None:
            raise FileNotFoundError(f"no preprocessor_config.json (or processor_config.json with an "
                                    f"'image_processor' entry) in {os.fspath(directory)!r}")
        return cls.from_dict(cfg)

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """(1, gh, gw) for an image of this size, without decoding it (for counting prompt tokens)."""
        if self.do_resize:
            height, width = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return 1, height // self.patch_size, width // self.patch_size

    def num_tokens(self, height: int, width: int) -> int:
        """LLM tokens (``<|image_pad|>`` count) for an image of this size: t*h*w / merge_size**2."""
        t, h, w = self.grid_thw(height, width)
        return t * h * w // self.merge_size ** 2

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (..., 3) -> float32 with HF's PIL-backend arithmetic: x*scale in float64 -> float32, then
        (x - mean) / std in float32 (the order matters for bit-equality)."""
        x = pixels
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32, copy=False)
            x = (x - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return x.astype(np.float32, copy=False)

    def preprocess_one(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (pixel rows [gh*gw, 3*tp*p*p], (1, gh, gw))."""
        img = load_image(image)
        if self.do_resize:
            h, w = smart_resize(img.height, img.width, self.factor, self.min_pixels, self.max_pixels)
            img = img.resize((w, h), resample=self.resample)
        x = self.normalize(np.asarray(img))  # (H, W, 3)
        frame = x.transpose(2, 0, 1)[None]  # (1, 3, H, W): one frame, repeated to temporal_patch_size
        return patchify(frame, self.patch_size, self.merge_size, self.temporal_patch_size)

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        """One image or a list -> (pixel_values float32 [N, 1536], image_grid_thw int64 [n_images, 3])."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("ImageProcessor got an empty list of images")
        rows, grids = [], []
        for item in items:
            r, g = self.preprocess_one(item)
            rows.append(r)
            grids.append(g)
        return np.concatenate(rows, axis=0), np.asarray(grids, dtype=np.int64)
