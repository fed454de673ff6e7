"""Vision-token merging (`vision_token_ratio`): the device merge against a plain-Python reference (an odd grid,
several frames, a video, padding rows; values and gradients), positions and rows of the host layout against
the unmerged ones, and the packed training batch against `prepare_inputs`."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3vl.configs import models
from qwen3vl.config import ModelConfig
from qwen3vl.data.datasets import SampleBuilder, processors_for
from qwen3vl.data.packing import Packer, to_model_inputs
from qwen3vl.data.synthetic import make_record
from qwen3vl.data.tokenizer import Tokenizer
from qwen3vl.model.inputs import prepare_inputs, visual_rows
from qwen3vl.model.token_merge import frame_tokens, merge_tokens
from qwen3vl.model.vision import vision_geometry
from qwen3vl.model.vlm import init_model

GRIDS = [(1, 6, 10), (1, 4, 4), (2, 2, 6)]  # merged grids 3x5 (odd), 2x2, and a 2-frame video of 1x3


def _reference(features, values, grids, ratio):
  """Frame by frame as the module docstring says: groups chosen from `features`, `values` averaged over them.
  Returns (averages, (row, col) of each survivor)."""
  out, coords, start = [], [], 0
  for t, h, w in grids:
    gh, gw = h // 2, w // 2
    for _ in range(t):
      n = gh * gw
      f, x = features[start:start + n], values[start:start + n]
      unit = f / np.linalg.norm(f, axis=-1, keepdims=True)
      cells = [(r, c) for r in range(gh) for c in range(gw)]
      best = {}
      for i, (r, c) in enumerate(cells):
        nbrs = [(r + dr) * gw + c + dc for dr, dc in ((0, -1), (0, 1), (-1, 0), (1, 0))
                if 0 <= r + dr < gh and 0 <= c + dc < gw]
        if (r + c) % 2 == 0 and nbrs:
          sims = [float(unit[i] @ unit[j]) for j in nbrs]
          best[i] = (max(sims), nbrs[int(np.argmax(sims))])
      merged = sorted(best, key=lambda i: -best[i][0])[:n - frame_tokens(n, ratio)]
      dst = {i: best[i][1] if i in merged else i for i in range(n)}
      for j in range(n):
        if j not in merged:
          out.append(x[[i for i in range(n) if dst[i] == j]].mean(0))
          coords.append(cells[j])
      start += n
  return np.stack(out), np.asarray(coords)


def _rows(ratio):
  """The merged-feature rows the host gives the tokens of GRIDS (images first, then the video)."""
  image, video = 262, 263
  n_image = sum(frame_tokens(h * w // 4, ratio) for t, h, w in GRIDS[:2])
  n_video = 2 * frame_tokens(2 * 6 // 4, ratio)
  ids = np.asarray([[image] * n_image + [video] * n_video])
  return visual_rows(ids, image, video, np.asarray(GRIDS), 2, ratio)[0]


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_merge_matches_reference(ratio):
  geometry = vision_geometry(np.asarray(GRIDS), 256, 2)
  n, pad = len(geometry.segment_ids) // 4, 3  # padding rows at the end, as the Packer leaves them
  seg = np.concatenate([geometry.segment_ids, np.zeros(4 * pad, np.int32)])
  rowcol = np.concatenate([geometry.rowcol, np.zeros((4 * pad, 2), np.int32)])
  rng = np.random.default_rng(0)
  features = rng.normal(size=(n + pad, 8)).astype(np.float32)
  deepstack = rng.normal(size=(2, n + pad, 8)).astype(np.float32)
  merge = jax.jit(lambda f, d: merge_tokens(f, d, seg, rowcol, 2, ratio))
  merged, ds, grid = merge(features, deepstack)

  rows = _rows(ratio)
  ref, coords = _reference(features, features, GRIDS, ratio)
  assert len(rows) == len(ref) < n
  np.testing.assert_allclose(np.asarray(merged)[rows], ref, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(grid)[rows], coords)
  np.testing.assert_allclose(np.asarray(ds)[1][rows], _reference(features, deepstack[1], GRIDS, ratio)[0], atol=1e-6)
  # Gradient: against a central difference along a random direction (the groups do not move for small steps).
  probe = jnp.asarray(rng.normal(size=merged.shape), jnp.float32)
  loss = lambda f: jnp.sum(merge(f, deepstack)[0] * probe)
  direction = rng.normal(size=features.shape).astype(np.float32)
  eps = 1e-3
  numeric = (float(loss(features + eps * direction)) - float(loss(features - eps * direction))) / (2 * eps)
  analytic = float(jnp.sum(jax.grad(loss)(jnp.asarray(features)) * direction))
  assert math.isclose(analytic, numeric, rel_tol=1e-2, abs_tol=1e-3)


def _builder(ratio):
  image_processor, video_processor = processors_for(_config(ratio).vision, min_pixels=32 * 32, max_pixels=64 * 64)
  return SampleBuilder(Tokenizer.builtin(), max_length=128, image_processor=image_processor,
                       video_processor=video_processor, token_ratio=ratio)


def _config(ratio):
  return ModelConfig.from_dict(models.get_config("tiny").to_dict()).replace(vision_token_ratio=ratio,
                                                                             attention_impl="xla")


def test_positions_are_the_survivors_grid_positions():
  record = make_record("eval", 0)
  full, half = _builder(1.0)(record), _builder(0.5)(record)
  cfg = _config(0.5)
  image = full.input_ids == cfg.image_token_id
  assert int((half.input_ids == cfg.image_token_id).sum()) * 2 == int(image.sum())  # half the image tokens
  assert len(half.input_ids) == len(full.input_ids) - int(image.sum()) // 2
  np.testing.assert_array_equal(half.positions.max(1), full.positions.max(1))  # text after the image unchanged
  model = init_model(cfg)
  inputs, _ = prepare_inputs(cfg, half.input_ids[None], pixel_values=half.image_pixels,
                             image_grid_thw=half.image_grid_thw)
  _, _, positions = nnx.jit(lambda m, i: m.embed_inputs(i))(model, inputs)
  merged = np.asarray(positions)[:, 0, half.input_ids == cfg.image_token_id].T  # [K, 3]
  grid = {tuple(p) for p in full.positions[:, image].T.tolist()}
  assert all(tuple(p) in grid for p in merged.tolist())  # each survivor sits at one of the image's positions
  order = [grid_index for grid_index in (sorted(grid).index(tuple(p)) for p in merged.tolist())]
  assert order == sorted(set(order))  # distinct, in raster order


def test_packed_batch_equals_prepare_inputs():
  cfg = _config(0.5)
  builder = _builder(0.5)
  samples = [builder(make_record("eval", i)) for i in range(3)]
  packer = Packer(2, 128, 768, builder=builder, merge_size=2, num_position_embeddings=256)
  batch = packer.pack_all(samples)[0]
  model = init_model(cfg)
  forward = nnx.jit(lambda m, i: m.forward(i)[0])
  packed = np.asarray(forward(model, to_model_inputs(batch)))
  places = [(r, k) for r in range(2) for k in range(1, int(batch["segment_ids"][r].max()) + 1)]
  assert len(places) == 3 and int((batch["segment_ids"][0] > 0).sum()) > len(samples[0].input_ids)  # packed
  for s in samples:  # every sample, wherever it was packed: its rows in the merged layout must be right
    r, k = next((r, k) for r, k in places
                if np.array_equal(batch["input_ids"][r, batch["segment_ids"][r] == k], s.input_ids))
    inputs, _ = prepare_inputs(cfg, s.input_ids[None], pixel_values=s.image_pixels, image_grid_thw=s.image_grid_thw)
    alone = np.asarray(forward(model, inputs))[0]
    np.testing.assert_allclose(packed[r, batch["segment_ids"][r] == k], alone, atol=1e-4)
