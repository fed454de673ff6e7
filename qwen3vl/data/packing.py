"""Fixed-shape training batches from variable-size samples, so the train step compiles once.

Text: B rows of L tokens. With pack=True several samples share a row (first fit, in arrival order); each gets
its own segment id 1..n (0 = padding) so attention stays inside a sample, and keeps the positions of its own
get_rope_index (they restart at 0 per sample). Targets and loss masks are copied per sample, so no target
crosses a sample boundary (a sample's last token has loss 0 by construction).

Vision: all patches of the batch in one [max_patches, patch_dim] array laid out as the model scatters them
(`Qwen3VL.embed_inputs`): the images of every row in row-major token order, then the videos the same way, then
padding rows (zero pixels, zero position weights, vision segment id 0). A sample that does not fit the
remaining row space or patch budget closes the batch and starts the next one.
"""
from __future__ import annotations

import copy
import functools

import numpy as np

from qwen3vl.data.datasets import Sample, SampleBuilder
from qwen3vl.data.tokenizer import Tokenizer
from qwen3vl.model.inputs import ModelInputs, visual_rows
from qwen3vl.model.vision import VisionGeometry, vision_geometry

__all__ = ["Packer", "to_model_inputs", "batch_stats", "batch_shapes", "BATCH_KEYS"]

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "visual_rows", "pixel_values",
              "vision_pos_index", "vision_pos_weight", "vision_rowcol", "vision_segment_ids")


def batch_shapes(batch_size: int, max_length: int, max_patches: int, patch_dim: int) -> dict:
    """{key: (shape, dtype)} of every batch the Packer makes with these sizes (also what the memory report
    compiles the train step for, without building a batch)."""
    B, L, P = batch_size, max_length, max_patches
    return {"input_ids": ((B, L), np.int32), "targets": ((B, L), np.int32), "loss_mask": ((B, L), np.float32),
            "segment_ids": ((B, L), np.int32), "positions": ((3, B, L), np.int32), "visual_rows": ((B, L), np.int32),
            "pixel_values": ((P, patch_dim), np.float32), "vision_pos_index": ((P, 4), np.int32),
            "vision_pos_weight": ((P, 4), np.float32), "vision_rowcol": ((P, 2), np.int32),
            "vision_segment_ids": ((P,), np.int32)}


@functools.lru_cache(maxsize=1024)
def _geometry(grid: tuple[int, int, int], num_position_embeddings: int, merge: int) -> VisionGeometry:
    """vision_geometry of one grid; cached since a dataset has few distinct grid sizes (a third of packing
    time otherwise)."""
    return vision_geometry(np.asarray([grid]), num_position_embeddings, merge)


class Packer:
    """Accumulates samples into one batch; `add` returns False when the sample belongs to the next batch.

    max_patches: vision rows per batch (a multiple of merge_size**2; 0 for text-only batches).
    tokenizer (+ min_pixels/max_pixels) or builder: how the Loader turns records into samples (`self.builder`);
      the tokenizer's pad id fills padding. Without either, the Packer only packs ready-made Samples.
    num_position_embeddings / merge_size: from the model's vision config (they shape the vision geometry).
    """

    def __init__(self, batch_size: int, max_length: int, max_patches: int, *, pack: bool = True,
                 tokenizer: Tokenizer | None = None, builder: SampleBuilder | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None, pad_id: int | None = None,
                 patch_dim: int | None = None, merge_size: int = 2, num_position_embeddings: int = 2304,
                 image_token_id: int | None = None, video_token_id: int | None = None):
        if batch_size <= 0 or max_length <= 1:
            raise ValueError(f"Packer needs batch_size > 0 and max_length > 1, got {batch_size}, {max_length}")
        if max_patches < 0 or max_patches % (merge_size * merge_size):
            raise ValueError(f"Packer.max_patches must be >= 0 and a multiple of merge_size**2 = "
                             f"{merge_size * merge_size}, got {max_patches}")
        if builder is None and tokenizer is not None:
            builder = SampleBuilder(tokenizer, max_length=max_length, min_pixels=min_pixels, max_pixels=max_pixels)
        self.builder = builder
        if patch_dim is None:
            patch_dim = builder.patch_dim if builder is not None else 1536
        if pad_id is None:
            pad_id = builder.tokenizer.special_ids["pad"] if builder is not None else 0
        self.batch_size, self.max_length, self.max_patches = int(batch_size), int(max_length), int(max_patches)
        self.pack, self.pad_id, self.patch_dim = bool(pack), int(pad_id), int(patch_dim)
        self.merge, self.num_position_embeddings = int(merge_size), int(num_position_embeddings)
        ids = builder.tokenizer.special_ids if builder is not None else {}
        self.image_token_id = int(image_token_id if image_token_id is not None else ids.get("image_token_id", 151655))
        self.video_token_id = int(video_token_id if video_token_id is not None else ids.get("video_token_id", 151656))
        self._reset()

    def clone(self) -> "Packer":
        """Same settings and builder, empty pending batch (each Loader packs with its own copy)."""
        other = copy.copy(self)
        other._reset()
        return other

    def _reset(self):
        self.rows: list[list[Sample]] = []
        self._used: list[int] = []
        self._patches = 0

    def __len__(self) -> int:
        """Samples in the pending batch."""
        return sum(len(r) for r in self.rows)

    def too_big(self, sample: Sample) -> str | None:
        """Why the sample can never fit an empty batch ("too_long" / "too_many_patches"), or None."""
        if sample.length > self.max_length:
            return "too_long"
        if sample.num_patches > self.max_patches:
            return "too_many_patches"
        return None

    def _row_for(self, sample: Sample) -> int | None:
        if self._patches + sample.num_patches > self.max_patches:
            return None
        if self.pack:
            for r, used in enumerate(self._used):
                if used + sample.length <= self.max_length:
                    return r
        if len(self.rows) < self.batch_size:
            return len(self.rows)
        return None

    def add(self, sample: Sample) -> bool:
        """Place the sample in the pending batch; False (nothing changed) if it must go to the next batch."""
        why = self.too_big(sample)
        if why:
            raise ValueError(f"sample can never fit a batch ({why}: {sample.length} tokens, "
                             f"{sample.num_patches} patches; max {self.max_length} / {self.max_patches})")
        r = self._row_for(sample)
        if r is None:
            return False
        if r == len(self.rows):
            self.rows.append([])
            self._used.append(0)
        self.rows[r].append(sample)
        self._used[r] += sample.length
        self._patches += sample.num_patches
        return True

    def flush(self) -> dict:
        """The pending batch as a dict of fixed-shape numpy arrays (BATCH_KEYS), and start a new one."""
        shapes = batch_shapes(self.batch_size, self.max_length, self.max_patches, self.patch_dim)
        batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}
        batch["input_ids"][:] = batch["targets"][:] = self.pad_id
        for r, row in enumerate(self.rows):
            off = 0
            for seg, s in enumerate(row, start=1):
                sl = slice(off, off + s.length)
                batch["input_ids"][r, sl] = s.input_ids
                batch["targets"][r, sl] = s.targets
                batch["loss_mask"][r, sl] = s.loss_mask
                batch["segment_ids"][r, sl] = seg
                batch["positions"][:, r, sl] = s.positions
                off += s.length
        ordered = [s for row in self.rows for s in row]  # row-major token order
        pixels = [s.image_pixels for s in ordered] + [s.video_pixels for s in ordered]
        grids = [s.image_grid_thw for s in ordered] + [s.video_grid_thw for s in ordered]
        grids = np.concatenate([np.zeros((0, 3), np.int64)] + [np.asarray(g, np.int64).reshape(-1, 3) for g in grids])
        ratio = self.builder.token_ratio if self.builder is not None else 1.0
        batch["visual_rows"][:] = visual_rows(batch["input_ids"], self.image_token_id, self.video_token_id, grids,
                                              self.merge, ratio)
        n = self._patches
        if n:
            batch["pixel_values"][:n] = np.concatenate(pixels)
            off, seg = 0, 0
            for grid in grids.tolist():
                g = _geometry(tuple(grid), self.num_position_embeddings, self.merge)
                sl = slice(off, off + len(g.segment_ids))
                batch["vision_pos_index"][sl] = g.pos_index
                batch["vision_pos_weight"][sl] = g.pos_weight
                batch["vision_rowcol"][sl] = g.rowcol
                batch["vision_segment_ids"][sl] = g.segment_ids + seg  # = vision_geometry(all grids)
                off, seg = sl.stop, seg + grid[0]
        self._reset()
        return batch

    def pack_all(self, samples) -> list[dict]:
        """All samples into batches (the last one partial); convenience for tests and evaluation sets."""
        out = []
        for s in samples:
            if not self.add(s):
                out.append(self.flush())
                self.add(s)
        if len(self):
            out.append(self.flush())
        return out


def batch_stats(batch: dict) -> dict:
    """Counters of a batch, from its arrays (kept out of the batch so it is a pure array pytree for jit)."""
    seg = batch["segment_ids"]
    tokens = int((seg > 0).sum())
    patches = int((batch["vision_segment_ids"] > 0).sum())
    P = batch["vision_segment_ids"].shape[0]
    return {"samples": int(seg.max(axis=1).sum()), "tokens": tokens, "loss_tokens": int(batch["loss_mask"].sum()),
            "padding_fraction": 1.0 - tokens / seg.size, "patches": patches,
            "patch_padding_fraction": (1.0 - patches / P) if P else 0.0}


def to_model_inputs(batch: dict) -> ModelInputs:
    """The model's device inputs from a Packer batch (targets/loss_mask stay with the trainer)."""
    has_vision = batch["pixel_values"].shape[0] > 0
    return ModelInputs(
        input_ids=batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
        pixel_values=batch["pixel_values"] if has_vision else None,
        vision=VisionGeometry(batch["vision_pos_index"], batch["vision_pos_weight"], batch["vision_rowcol"],
                              batch["vision_segment_ids"]) if has_vision else None,
        visual_rows=batch["visual_rows"] if has_vision else None)
