"""Host-side preparation of one model call: positions, segment ids, vision geometry, and input checks.

Everything that depends on token values or grid sizes is computed here with numpy, once per batch, so the
device forward (`Qwen3VL.forward`) is a pure function of static-shaped arrays and compiles once per shape.
The data pipeline (training) and the public `Qwen3VL.__call__` both build a `ModelInputs` this way.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from qwen3vl.config import ModelConfig
from qwen3vl.model.positions import get_rope_index
from qwen3vl.model.token_merge import frame_tokens
from qwen3vl.model.vision import VisionGeometry, vision_geometry


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelInputs:
  input_ids: np.ndarray  # [B, L] int32
  positions: np.ndarray  # [3, B, L] int32 MRoPE rows (t, h, w)
  segment_ids: np.ndarray  # [B, L] int32: 0 = padding, >= 1 = sample id (packing)
  # All visual patches of the batch: images (in token order), then videos, then optional padding rows
  # (segment id 0, never scattered) that keep the shape fixed across training batches.
  pixel_values: np.ndarray | None = None  # [N, patch_dim]
  vision: VisionGeometry | None = None
  visual_rows: np.ndarray | None = None  # [B, L] int32: row of the merged visual features per token, -1 = text


def visual_rows(input_ids, image_token_id: int, video_token_id: int, grids=None, merge: int = 2,
                token_ratio: float = 1.0) -> np.ndarray:
  """[B, L] int32: for each image / video pad token the row of the tower's merged output it takes, -1 for text.
  Merged rows hold the images in row-major token order, then the videos (the layout `prepare_inputs` and the
  Packer give the tower); a batch assembled from several hosts' blocks adds each block's offset. With token
  merging (token_ratio < 1; `grids` [n, 3] of the images then the videos, in that order) a frame's tokens take
  the first rows of the frame's unmerged block (model/token_merge.py)."""
  ids = np.asarray(input_ids)
  image, video = ids == image_token_id, ids == video_token_id
  rows = np.full(ids.shape, -1, np.int32)
  n_image = int(image.sum())
  if token_ratio >= 1 or grids is None:
    sequence = np.arange(n_image + int(video.sum()))
  else:
    blocks, start = [], 0
    for t, h, w in np.asarray(grids, np.int64).reshape(-1, 3).tolist():
      n = h * w // (merge * merge)
      for _ in range(t):
        blocks.append(start + np.arange(frame_tokens(n, token_ratio)))
        start += n
    sequence = np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
  rows[image] = sequence[:n_image]
  rows[video] = sequence[n_image:]
  return rows


def prepare_inputs(cfg: ModelConfig, input_ids, *, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, attention_mask=None,
                   position_ids=None) -> tuple[ModelInputs, np.ndarray]:
  """Checks the inputs and returns (ModelInputs, rope_deltas [B, 1])."""
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
  merge = cfg.vision.spatial_merge_size
  grids = []
  for name, pixels, grid, token in (("image", pixel_values, image_grid_thw, cfg.image_token_id),
                                    ("video", pixel_values_videos, video_grid_thw, cfg.video_token_id)):
    n_tokens = int((ids == token).sum())
    if pixels is None:
      if n_tokens:
        raise ValueError(f"input_ids hold {n_tokens} {name} tokens but no {name} pixels were given")
      continue
    if grid is None:
      raise ValueError(f"{name} pixels were given without {name}_grid_thw")
    grid = np.asarray(grid, dtype=np.int64).reshape(-1, 3)
    n_patches = int(grid.prod(-1).sum())
    if np.shape(pixels) != (n_patches, cfg.vision.patch_dim):
      raise ValueError(f"{name} pixel values have shape {np.shape(pixels)}, but {name}_grid_thw "
                       f"{grid.tolist()} needs ({n_patches}, {cfg.vision.patch_dim})")
    expected = sum(t * frame_tokens(h * w // merge**2, cfg.vision_token_ratio) for t, h, w in grid.tolist())
    if n_tokens != expected:
      raise ValueError(f"{name} tokens and {name} features do not match: input_ids hold {n_tokens} "
                       f"{name} tokens, {name}_grid_thw {grid.tolist()} gives {expected}")
    grids.append(grid)
  if position_ids is None:
    positions, deltas = get_rope_index(
        ids, image_grid_thw=None if pixel_values is None else image_grid_thw,
        video_grid_thw=None if pixel_values_videos is None else video_grid_thw, attention_mask=mask,
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, spatial_merge_size=merge, token_ratio=cfg.vision_token_ratio)
  else:
    positions = np.asarray(position_ids)
    positions = np.broadcast_to(positions, (3,) + ids.shape) if positions.ndim == 2 else positions
    deltas = positions.max(axis=(0, 2))[:, None] + 1 - ids.shape[1]
  pixels = [np.asarray(p, np.float32) for p in (pixel_values, pixel_values_videos) if p is not None]
  inputs = ModelInputs(
      input_ids=ids.astype(np.int32), positions=np.asarray(positions, np.int32),
      segment_ids=(mask != 0).astype(np.int32),
      pixel_values=np.concatenate(pixels) if pixels else None,
      vision=vision_geometry(np.concatenate(grids), cfg.vision.num_position_embeddings, merge) if grids else None,
      visual_rows=visual_rows(ids, cfg.image_token_id, cfg.video_token_id, np.concatenate(grids), merge,
                              cfg.vision_token_ratio) if grids else None)
  return inputs, np.asarray(deltas)
