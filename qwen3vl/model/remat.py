"""Rematerialization: named activations (`checkpoint_name` tags) and the presets that decide which to keep.

Every stacked layer (decoder and vision block) runs under `jax.checkpoint` with one of these policies unless the
preset is `none`; a separate preset applies to the vision tower (`ModelConfig.vision_remat`). Presets:

  none                     no checkpointing: the backward pass reads every intermediate the forward made
  full                     keep only each layer's input; recompute the layer in the backward pass
  dots_with_no_batch_dims  keep the outputs of weight matmuls (jax's `dots_with_no_batch_dims_saveable`)
  minimal                  keep the tagged projections and attention outputs; recompute norms, RoPE, activations
  minimal_offload          as minimal, but the kept tensors go to pinned host memory and come back for the backward
  custom                   per tag: `ModelConfig.remat_custom = "attention:device,q_proj:offload,..."`;
                           tags not named are recomputed

Tags name what a layer produces, so a policy reads like a list of tensors; `python -m qwen3vl.tools.memory --saved`
prints what a preset actually keeps per layer (through `jax.ad_checkpoint.print_saved_residuals`).
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

# Decoder tags (per layer), then vision tags. MoE tags are the expert outputs in routed order.
TEXT_TAGS = ("q_proj", "k_proj", "v_proj", "attention", "o_proj", "mlp_gate", "mlp_up", "mlp_down",
             "moe_gate_up", "moe_down")
VISION_TAGS = ("vision_qkv", "vision_attention", "vision_proj", "vision_fc1", "vision_fc2")
TAGS = TEXT_TAGS + VISION_TAGS
PRESETS = ("none", "full", "dots_with_no_batch_dims", "minimal", "minimal_offload", "custom")
PLACES = ("device", "offload", "remat")

tag = checkpoint_name  # x -> x, named for the policies (a no-op outside jax.checkpoint)


def parse_custom(spec: str) -> dict[str, str]:
  """'q_proj:offload, attention:device' -> {tag: place}; unknown tags or places raise naming the bad entry."""
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, _, place = item.partition(":")
    name, place = name.strip(), place.strip() or "device"
    if name not in TAGS:
      raise ValueError(f"remat_custom entry {item!r}: unknown tag {name!r}; tags: {', '.join(TAGS)}")
    if place not in PLACES:
      raise ValueError(f"remat_custom entry {item!r}: place must be one of {PLACES}")
    out[name] = place
  return out


def policy(preset: str, custom: str = "") -> Callable | None:
  """The `jax.checkpoint` policy of a preset; None for `none` (run the layer without checkpointing)."""
  cp = jax.checkpoint_policies
  if preset == "none":
    return None
  if preset == "full":
    return cp.nothing_saveable
  if preset == "dots_with_no_batch_dims":
    return cp.dots_with_no_batch_dims_saveable
  if preset in ("minimal", "minimal_offload", "custom"):
    places = parse_custom(custom) if preset == "custom" else {
        t: "offload" if preset == "minimal_offload" else "device" for t in TAGS}
    keep = [t for t, p in places.items() if p == "device"]
    offload = [t for t, p in places.items() if p == "offload"]
    if not offload:
      return cp.save_only_these_names(*keep)
    return cp.save_and_offload_only_these_names(names_which_can_be_saved=keep, names_which_can_be_offloaded=offload,
                                                offload_src="device", offload_dst="pinned_host")
  raise ValueError(f"unknown remat preset {preset!r}; choose one of {PRESETS}")
