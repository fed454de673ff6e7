"""3-D (MRoPE) position ids for Qwen3-VL, computed on the host with numpy.

Why host-side numpy: the positions depend on the *values* of the image/video grids (t, h, w) and on
where the vision-pad runs sit in each row, i.e. on data-dependent shapes. They are computed once per
prompt (prefill) and then fed to the jitted model as an ordinary int array; decode steps only need
`decode_positions`, which is a trivial add.

Reference: Hugging Face transformers 5.24 `Qwen3VLModel.get_rope_index` (modeling_qwen3_vl.py). What we
match, exactly (checked against fixtures produced by that code, see tests/test_positions.py):

* Modality runs.  HF 5.24 does not scan for `<|vision_start|>` any more (v4.57 did); it groups the
  processor's `mm_token_type_ids` (0 text, 1 image, 2 video) into maximal runs of equal type with
  `itertools.groupby`, after dropping padding (attention_mask == 0).  The processor builds those ids as
  `input_ids == image_token_id -> 1`, `input_ids == video_token_id -> 2`, so deriving them from
  `input_ids` (what we do unless `mm_token_type_ids` is passed) gives identical runs.  Every run of
  vision type consumes the next grid of its modality; grids are consumed in order *across the whole
  batch* (row 0's images first, then row 1's, ...), as HF's single iterator does.
* Video grids are split per temporal patch: a video row (T, H, W) becomes T rows (1, H, W), because the
  prompt holds one `<|vision_start|> ... <|vision_end|>` block per temporal patch (timestamp text in
  between).  `<|vision_start|>`, `<|vision_end|>` and timestamp text are ordinary text tokens.
* Text run of length n: positions next .. next+n-1 on all three axes; next += n.
  Vision run with grid (t, h, w), gh = h/m, gw = w/m: token k = (tt*gh + r)*gw + c gets
  (next+tt, next+r, next+c); then next += max(h, w) // m  (HF 5.24 rule; t is not added).
* Padding positions (attention_mask == 0) are **0** on all axes (HF 5.24 initialises with zeros; v4.57
  used 1).  They are masked anyway.
* rope_deltas[b] = max(position in row b) + 1 - (number of *unpadded* tokens in row b)  (HF 5.24 uses the
  filtered length; v4.57 used the padded length L).  For rows without padding both agree.  With
  padding, the decode position is `text position + delta` where the text position of a cache slot is
  `slot - #padding`; `decode_positions(..., attention_mask=...)` applies that correction.
* Text-only input (no grids) follows the same rule and gives cumsum(mask) - 1 with padding 0 and
  delta 0, which is also what HF 5.24 `generate` uses for text-only prompts.

Stricter than HF: we raise a ValueError naming the counts when the number of image/video pad tokens
does not match the grids, or when one vision run does not cover exactly one grid (HF either crashes
with a shape error or silently ignores surplus grids).
"""
from __future__ import annotations

import numpy as np

from qwen3vl.model.token_merge import frame_tokens

IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652

__all__ = ["get_rope_index", "text_positions", "decode_positions", "split_video_grids"]


def _as_2d_int(x, name):
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape [B, L], got {a.shape}")
    return a.astype(np.int64, copy=False)


def _as_grid(g, name):
    if g is None:
        return np.zeros((0, 3), np.int64)
    a = np.asarray(g, dtype=np.int64)
    if a.size == 0:
        return np.zeros((0, 3), np.int64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3] (t, h, w), got {a.shape}")
    return a


def split_video_grids(video_grid_thw) -> np.ndarray:
    """(T, H, W) rows -> T rows of (1, H, W): one grid per timestamped block in the prompt."""
    g = _as_grid(video_grid_thw, "video_grid_thw")
    out = np.repeat(g, g[:, 0], axis=0)
    out[:, 0] = 1
    return out


def text_positions(attention_mask) -> np.ndarray:
    """Plain 1-D positions cumsum(mask) - 1 with padding set to 0, shape [B, L].

    Why: the causal/padding mask (and packed-sequence detection) must come from ordinary text positions,
    never from MRoPE rows, which repeat inside images. Same as HF 5.24 `_prepare_position_ids_for_generation`.
    """
    m = _as_2d_int(attention_mask, "attention_mask") != 0
    pos = np.cumsum(m, axis=-1, dtype=np.int64) - 1
    return np.where(m, pos, 0)


def get_rope_index(
    input_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    *,
    mm_token_type_ids=None,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
    vision_start_token_id: int = VISION_START_TOKEN_ID,
    spatial_merge_size: int = 2,
    token_ratio: float = 1.0,
):
    """3-D MRoPE position ids and rope deltas, numerically equal to HF transformers 5.24.

    Args:
      input_ids: int [B, L] (or [L]).
      image_grid_thw: int [num_images, 3] patch grids (before merging), in prompt order over the batch.
      video_grid_thw: int [num_videos, 3]; each row is split into t rows of (1, h, w).
      attention_mask: [B, L], nonzero = real token; None = no padding. Left and right padding both work.
      mm_token_type_ids: optional [B, L] (0 text / 1 image / 2 video) as the HF processor returns; by default
        derived from input_ids (identical for processor output).
      vision_start_token_id: accepted for API compatibility with the v4.57 algorithm; unused, since runs are
        found from pad-token types exactly like HF 5.24 (a vision_start is just a text token).
      spatial_merge_size: m (2 for all released Qwen3-VL models).
      token_ratio: < 1 with vision-token merging (model/token_merge.py): each frame holds `frame_tokens` pad
        tokens, and they get the frame's origin (t, and the run start on all axes); the model adds each
        surviving token's (0, row, col) on device. Text positions are those of the unmerged layout.

    Returns:
      position_ids int64 [3, B, L] (axes t, h, w; padding -> 0) and rope_deltas int64 [B, 1]
      (= max position + 1 - number of unpadded tokens, HF 5.24 convention).

    Raises:
      ValueError if image/video pad-token counts do not match the grids.
    """
    del vision_start_token_id  # see docstring
    ids = _as_2d_int(input_ids, "input_ids")
    B, L = ids.shape
    if attention_mask is None:
        valid = np.ones((B, L), bool)
    else:
        valid = _as_2d_int(attention_mask, "attention_mask") != 0
        if valid.shape != (B, L):
            raise ValueError(f"attention_mask shape {valid.shape} != input_ids shape {(B, L)}")
    if mm_token_type_ids is None:
        types = np.zeros((B, L), np.int64)
        types[ids == image_token_id] = 1
        types[ids == video_token_id] = 2
    else:
        types = _as_2d_int(mm_token_type_ids, "mm_token_type_ids")
        if types.shape != (B, L):
            raise ValueError(f"mm_token_type_ids shape {types.shape} != input_ids shape {(B, L)}")

    m = int(spatial_merge_size)
    grids = {1: _as_grid(image_grid_thw, "image_grid_thw"), 2: split_video_grids(video_grid_thw)}
    names = {1: "image", 2: "video"}
    for k, g in grids.items():
        if (g[:, 1:] % m).any():
            raise ValueError(f"{names[k]} grid h, w must be multiples of spatial_merge_size={m}: {g.tolist()}")
        n_tokens = int(np.count_nonzero((types == k) & valid))
        n_expected = sum(t * frame_tokens(h * w // (m * m), token_ratio) for t, h, w in g.tolist())
        if n_tokens != n_expected:
            raise ValueError(
                f"{names[k]} placeholder mismatch: input_ids hold {n_tokens} {names[k]} pad tokens (unpadded), "
                f"but the {len(g)} {names[k]} grid(s) {g.tolist()} need {n_expected} "
                f"(sum of t*h*w/{m * m}{', video grids split per temporal patch' if k == 2 else ''}"
                f"{f', merged to ratio {token_ratio:g}' if token_ratio < 1 else ''})"
            )
    next_grid = {1: 0, 2: 0}

    position_ids = np.zeros((3, B, L), np.int64)
    deltas = np.zeros((B, 1), np.int64)
    for b in range(B):
        row_types = types[b][valid[b]]
        n = row_types.shape[0]
        out = np.empty((3, n), np.int64)
        # maximal runs of equal type (HF: itertools.groupby over mm_token_type_ids)
        starts = np.concatenate(([0], np.flatnonzero(np.diff(row_types)) + 1)) if n else np.zeros(0, np.int64)
        ends = np.concatenate((starts[1:], [n])) if n else starts
        cur = 0
        for s, e in zip(starts.tolist(), ends.tolist()):
            kind = int(row_types[s])
            if kind == 0:
                out[:, s:e] = np.arange(cur, cur + e - s)
                cur += e - s
                continue
            if kind not in grids:
                raise ValueError(f"unknown mm token type {kind} in row {b}")
            gi = next_grid[kind]
            if gi >= len(grids[kind]):  # unreachable after the count check, kept for safety
                raise ValueError(f"more {names[kind]} runs than {names[kind]} grids")
            t, h, w = (int(v) for v in grids[kind][gi])
            next_grid[kind] = gi + 1
            gh, gw = h // m, w // m
            per_frame = frame_tokens(gh * gw, token_ratio)
            if e - s != t * per_frame:
                raise ValueError(
                    f"row {b}: a run of {e - s} {names[kind]} pad tokens at unpadded offset {s} does not match "
                    f"{names[kind]} grid #{gi} {(t, h, w)} which needs {t * per_frame} tokens; each "
                    f"vision_start..vision_end block must hold exactly one grid"
                )
            if per_frame < gh * gw:  # merged: frame origins, the model adds (0, row, col) of each survivor
                out[0, s:e] = np.repeat(np.arange(t), per_frame) + cur
                out[1:, s:e] = cur
            else:
                tt, rr, cc = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                out[0, s:e] = tt.reshape(-1) + cur
                out[1, s:e] = rr.reshape(-1) + cur
                out[2, s:e] = cc.reshape(-1) + cur
            cur += max(h, w) // m
        position_ids[:, b, valid[b]] = out
        deltas[b, 0] = (int(out.max()) + 1 - n) if n else 0
    return position_ids, deltas


def decode_positions(cache_index, rope_deltas, num_tokens: int = 1, attention_mask=None) -> np.ndarray:
    """[3, B, num_tokens] positions for tokens written at KV-cache slots cache_index .. cache_index+n-1.

    HF rule: text position of the new token + rope_delta, the same on all three axes. Without padding the
    text position is the cache slot. With padding (rope_deltas from `get_rope_index` use the unpadded length,
    HF 5.24) pass the attention_mask of what is already in the cache (the prompt mask is enough): its zeros
    are subtracted, so row b continues at max_position_b + 1 + step, as HF `generate` does.

    cache_index: int, or int [B] for per-row slots.
    """
    d = np.asarray(rope_deltas, np.int64).reshape(-1)
    B = d.shape[0]
    start = np.broadcast_to(np.asarray(cache_index, np.int64).reshape(-1), (B,)).copy()
    if attention_mask is not None:
        m = _as_2d_int(attention_mask, "attention_mask")
        if m.shape[0] != B:
            raise ValueError(f"attention_mask batch {m.shape[0]} != rope_deltas batch {B}")
        start -= np.count_nonzero(m == 0, axis=-1)
    pos = start[:, None] + np.arange(num_tokens, dtype=np.int64)[None, :] + d[:, None]
    return np.broadcast_to(pos[None], (3, B, num_tokens)).copy()
