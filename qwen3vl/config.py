"""Model configuration: frozen dataclasses, read from / written to Hugging Face `config.json`.

The model code takes these dataclasses (hashable, so they can be static under jit); the ml_collections files in
`configs/` build them through `ModelConfig.from_dict`. Architecture fields mirror HF names where they exist;
runtime switches (dtypes, scanning, kernel choice) live in `ModelConfig` too but never go to `config.json`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from qwen3vl.model import remat

SUPPORTED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
# ModelConfig fields that are runtime switches, not architecture (never written to config.json).
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "attention_impl", "moe_impl", "moe_dispatch",
                  "moe_capacity_factor", "vision_block_size", "remat",
                  "vision_remat", "remat_custom", "exit_layers", "exit_threshold", "precision", "vision_token_ratio",
                  "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "base_quant")
PRECISION_PARTS = ("vision", "decoder", "head")
PRECISION_DTYPES = ("float32", "bfloat16", "float16", "float8")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 27
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 16
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  out_hidden_size: int = 2048
  num_position_embeddings: int = 2304
  deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
  rope_theta: float = 10000.0
  layer_norm_eps: float = 1e-6  # hard-coded in HF, not read from config.json

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 6144
  num_hidden_layers: int = 28
  num_attention_heads: int = 16
  num_key_value_heads: int = 8
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 5_000_000.0
  mrope_section: tuple[int, int, int] = (24, 20, 20)
  max_position_embeddings: int = 262144
  # Mixture of experts (num_experts == 0: dense model).
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  norm_topk_prob: bool = True
  router_aux_loss_coef: float = 0.001

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def is_moe_layer(self, i: int) -> bool:
    return self.is_moe and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  tie_word_embeddings: bool = False
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  # Cross-layer parameter sharing (not a HF field): groups of this many consecutive decoder layers run one set
  # of weights; checkpoints store each group once, `save_pretrained` writes it out per layer.
  share_every: int = 1
  # Mixture-of-Depths (not a HF field, model/depth.py): every `mod_every`-th decoder layer (layers i with
  # (i + 1) % mod_every == 0) processes only the top `mod_capacity` fraction of each row's tokens in training,
  # and the tokens its causal predictor picks at inference. 0 = off.
  mod_every: int = 0
  mod_capacity: float = 0.5
  # Runtime switches: not part of the checkpoint.
  dtype: str = "float32"  # compute dtype of activations
  param_dtype: str = "float32"
  scan_layers: bool = True
  attention_impl: str | None = None  # None: kernels.attention picks (see kernels/attention.py)
  # "ragged" (jax.lax.ragged_dot, dropless), "blocked" (the same, padded blocks and a batched matmul: XLA:CPU) or
  # "dense" (reference, all experts)
  moe_impl: str = "ragged"
  # How an `expert` mesh axis moves token copies (model/moe.py): "all_to_all" (each copy once, to its expert's
  # device: model/expert_exchange.py) or "all_gather" (every copy of the expert group to every device).
  moe_dispatch: str = "all_to_all"
  # all_to_all only: rows a device receives = this x its own token copies (copies past that are dropped and
  # counted in the metrics); 0 = dropless (room for every copy of the expert group).
  moe_capacity_factor: float = 0.0
  # > 0: vision attention through kernels.block_sparse_attention over the per-image block layout, so packed images
  # cost the sum of their squared lengths (in blocks of this many patches); 0: kernels.attention with segment ids.
  vision_block_size: int = 128
  # Rematerialization presets (model/remat.py) of the decoder layers and of the vision blocks, and the per-tag
  # choice of the `custom` preset ("q_proj:offload,attention:device"; unnamed tags are recomputed).
  remat: str = "none"
  vision_remat: str = "none"
  remat_custom: str = ""
  # Early exit in decoding (CALM-style): after these decoder layers a token whose top next-token probability
  # (shared LM head) exceeds the threshold skips the rest; the skipped layers' KV come from its exit state.
  # 1.0 never exits (the full model's outputs).
  exit_layers: tuple[int, ...] = ()
  exit_threshold: float = 1.0
  # Per-module compute precision over `dtype`: "vision=bfloat16,decoder=float8,head=float32". float8 = the
  # module's matmuls in float8 (e4m3, one scale per tensor, float32 accumulation), activations in `dtype`.
  precision: str = ""
  # Vision-token merging (model/token_merge.py): the fraction of each frame's visual tokens the LLM sees, similar
  # neighbours merged on device; the prompt holds that many pad tokens per frame. 1.0 = off (exact).
  vision_token_ratio: float = 1.0
  # LoRA (model/lora.py): adapters of this rank on the named weights (`lora.TARGETS` names or groups), scaled by
  # alpha / rank; 0 = none. `base_quant`: the frozen base's projections and experts held as "int8" or "nf4"
  # codes (model/quant.py); "" = in param_dtype.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ()
  base_quant: str = ""

  def precision_of(self, part: str) -> tuple[str, bool]:
    """(activation dtype, float8 matmuls?) of a part: vision, decoder or head."""
    chosen = dict(item.split("=") for item in filter(None, self.precision.replace(" ", "").split(",")))
    name = chosen.get(part, self.dtype)
    return (self.dtype, True) if name == "float8" else (name, False)

  @property
  def lora_spec(self):
    """The LoRA adapters' spec, or None without adapters."""
    from qwen3vl.model.lora import LoraSpec
    return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets) if self.lora_rank else None

  @property
  def model_type(self) -> str:
    return "qwen3_vl_moe" if self.text.is_moe else "qwen3_vl"

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def validate(self) -> "ModelConfig":
    t, v = self.text, self.vision
    _check(t.num_attention_heads % t.num_key_value_heads == 0, "text.num_key_value_heads",
           f"{t.num_key_value_heads} must divide num_attention_heads={t.num_attention_heads}")
    _check(t.head_dim % 2 == 0 and sum(t.mrope_section) == t.head_dim // 2, "text.mrope_section",
           f"{t.mrope_section} must sum to head_dim/2={t.head_dim // 2}")
    _check(v.hidden_size % v.num_heads == 0, "vision.num_heads",
           f"{v.num_heads} must divide vision.hidden_size={v.hidden_size}")
    _check(v.head_dim % 4 == 0, "vision.hidden_size", f"vision head_dim {v.head_dim} must be a multiple of 4")
    _check(all(0 <= i < v.depth for i in v.deepstack_visual_indexes), "vision.deepstack_visual_indexes",
           f"{v.deepstack_visual_indexes} must lie in [0, depth={v.depth})")
    _check(list(v.deepstack_visual_indexes) == sorted(set(v.deepstack_visual_indexes)),
           "vision.deepstack_visual_indexes", f"{v.deepstack_visual_indexes} must be strictly increasing")
    _check(len(v.deepstack_visual_indexes) <= t.num_hidden_layers, "vision.deepstack_visual_indexes",
           "more DeepStack levels than decoder layers")
    _check(v.out_hidden_size == t.hidden_size, "vision.out_hidden_size",
           f"{v.out_hidden_size} must equal text.hidden_size={t.hidden_size}")
    if t.is_moe:
      _check(0 < t.num_experts_per_tok <= t.num_experts, "text.num_experts_per_tok",
             f"{t.num_experts_per_tok} must be in [1, num_experts={t.num_experts}]")
      _check(t.moe_intermediate_size > 0, "text.moe_intermediate_size", "must be > 0 for an MoE model")
      kinds = {t.is_moe_layer(i) for i in range(t.num_hidden_layers)}
      _check(len(kinds) == 1, "text.mlp_only_layers / decoder_sparse_step",
             "mixing dense and MoE decoder layers is not supported (every released model is all-MoE)")
    _check(self.share_every >= 1 and t.num_hidden_layers % self.share_every == 0, "share_every",
           f"{self.share_every} must be >= 1 and divide text.num_hidden_layers={t.num_hidden_layers}")
    if self.mod_every:
      _check(self.mod_every >= 1 and t.num_hidden_layers % self.mod_every == 0, "mod_every",
             f"{self.mod_every} must divide text.num_hidden_layers={t.num_hidden_layers}")
      _check(self.share_every == 1, "mod_every", "Mixture-of-Depths with share_every > 1 is not supported")
      _check(0.0 < self.mod_capacity <= 1.0, "mod_capacity", f"{self.mod_capacity} must be in (0, 1]")
      _check(not self.exit_layers, "exit_layers", "early exit does not combine with Mixture-of-Depths")
    _check(all(0 <= i < t.num_hidden_layers - 1 for i in self.exit_layers), "exit_layers",
           f"{self.exit_layers} must lie in [0, num_hidden_layers - 1 = {t.num_hidden_layers - 1})")
    for item in filter(None, self.precision.replace(" ", "").split(",")):
      part, _, name = item.partition("=")
      _check(part in PRECISION_PARTS and name in PRECISION_DTYPES, "precision",
             f"entry {item!r}: parts are {PRECISION_PARTS}, dtypes {PRECISION_DTYPES}")
    _check(0.0 < self.vision_token_ratio <= 1.0, "vision_token_ratio",
           f"{self.vision_token_ratio} must be in (0, 1]")
    _check(0.0 < self.exit_threshold <= 1.0, "exit_threshold", f"{self.exit_threshold} must be in (0, 1]")
    _check(self.moe_dispatch in ("all_gather", "all_to_all"), "moe_dispatch",
           f"{self.moe_dispatch!r} is not 'all_gather' or 'all_to_all'")
    _check(self.moe_capacity_factor >= 0 and (self.moe_capacity_factor == 0 or self.moe_dispatch == "all_to_all"),
           "moe_capacity_factor", f"{self.moe_capacity_factor} must be >= 0, and 0 (dropless) unless "
           "moe_dispatch='all_to_all'")
    _check(self.moe_impl in ("ragged", "blocked", "dense"), "moe_impl",
           f"{self.moe_impl!r} is not 'ragged', 'blocked' or 'dense'")
    for field in ("remat", "vision_remat"):
      _check(getattr(self, field) in remat.PRESETS, field, f"{getattr(self, field)!r} is not one of {remat.PRESETS}")
    try:
      remat.parse_custom(self.remat_custom)
    except ValueError as e:
      _check(False, "remat_custom", str(e))
    _check(self.lora_rank >= 0, "lora_rank", f"{self.lora_rank} must be >= 0")
    _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"{self.lora_dropout} must be in [0, 1)")
    if self.lora_rank:
      from qwen3vl.model.lora import parse_targets
      try:
        _check(parse_targets(self.lora_targets) == tuple(self.lora_targets), "lora_targets",
               f"{self.lora_targets} must be target names in the order of qwen3vl.model.lora.TARGETS")
      except ValueError as e:
        _check(False, "lora_targets", str(e))
      _check(bool(self.lora_targets), "lora_targets", "LoRA needs at least one target")
    _check(self.base_quant in ("", "int8", "nf4"), "base_quant", f"{self.base_quant!r} is not '', 'int8' or 'nf4'")
    _check(self.vision_block_size >= 0, "vision_block_size", f"{self.vision_block_size} must be >= 0")
    return self

  # ---------------------------------------------------------------------------------------------- dicts
  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """From a nested plain dict (e.g. an ml_collections ConfigDict's `to_dict()`), unknown keys rejected."""
    d = dict(d)
    vision = _build(VisionConfig, d.pop("vision", {}), "vision")
    text = _build(TextConfig, d.pop("text", {}), "text")
    return _build(cls, d, "model", vision=vision, text=text).validate()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  # ------------------------------------------------------------------------------------ HF config.json
  @classmethod
  def from_hf(cls, hf: dict[str, Any], **runtime) -> "ModelConfig":
    """From a HF Qwen3-VL / Qwen3-VL-MoE `config.json` dict, 4.57 layout (`rope_theta`/`rope_scaling` in
    text_config) or transformers-5 layout (`rope_parameters`)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {SUPPORTED_MODEL_TYPES}")
    tc, vc = hf.get("text_config") or {}, hf.get("vision_config") or {}
    rope = dict(tc.get("rope_scaling") or {})
    rope.update(tc.get("rope_parameters") or {})
    theta = rope.get("rope_theta", tc.get("rope_theta", 5_000_000.0))
    heads = tc.get("num_attention_heads", 16)
    moe = model_type == "qwen3_vl_moe"
    num_experts = tc.get("num_experts", tc.get("num_local_experts", 0))  # transformers 5 writes the latter
    text = TextConfig(
        vocab_size=tc.get("vocab_size", 151936),
        hidden_size=tc["hidden_size"],
        intermediate_size=tc.get("intermediate_size", 0),
        num_hidden_layers=tc["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=tc.get("num_key_value_heads") or heads,
        head_dim=tc.get("head_dim") or tc["hidden_size"] // heads,
        rms_norm_eps=tc.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
        max_position_embeddings=tc.get("max_position_embeddings", 262144),
        num_experts=num_experts if moe else 0,
        num_experts_per_tok=tc.get("num_experts_per_tok", 0) if moe else 0,
        moe_intermediate_size=tc.get("moe_intermediate_size", 0) if moe else 0,
        decoder_sparse_step=tc.get("decoder_sparse_step", 1),
        mlp_only_layers=tuple(tc.get("mlp_only_layers", ())),
        norm_topk_prob=tc.get("norm_topk_prob", True),
        router_aux_loss_coef=tc.get("router_aux_loss_coef", 0.001),
    )
    vrope = vc.get("rope_parameters") or {}
    vision = VisionConfig(
        depth=vc["depth"],
        hidden_size=vc["hidden_size"],
        intermediate_size=vc["intermediate_size"],
        num_heads=vc["num_heads"],
        in_channels=vc.get("in_channels", 3),
        patch_size=vc.get("patch_size", 16),
        temporal_patch_size=vc.get("temporal_patch_size", 2),
        spatial_merge_size=vc.get("spatial_merge_size", 2),
        out_hidden_size=vc.get("out_hidden_size", text.hidden_size),
        num_position_embeddings=vc.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=tuple(vc.get("deepstack_visual_indexes", (8, 16, 24))),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    # The top-level flag is what HF reads for the tie; older files carry it in text_config only.
    tie = hf.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))
    return cls(
        vision=vision, text=text, tie_word_embeddings=bool(tie),
        image_token_id=hf.get("image_token_id", 151655), video_token_id=hf.get("video_token_id", 151656),
        vision_start_token_id=hf.get("vision_start_token_id", 151652),
        vision_end_token_id=hf.get("vision_end_token_id", 151653), **runtime).validate()

  def to_hf(self) -> dict[str, Any]:
    """The released (transformers 4.57) `config.json` layout; transformers 5 reads it too."""
    t, v = self.text, self.vision
    text = {
        "model_type": "qwen3_vl_moe_text" if t.is_moe else "qwen3_vl_text",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps, "attention_bias": False, "attention_dropout": 0.0,
        "max_position_embeddings": t.max_position_embeddings, "rope_theta": t.rope_theta,
        "rope_scaling": {"rope_type": "default", "mrope_section": list(t.mrope_section),
                         "mrope_interleaved": True},
        "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": 151643, "eos_token_id": 151645,
        "dtype": self.param_dtype,
    }
    if t.is_moe:
      text.update(num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
                  moe_intermediate_size=t.moe_intermediate_size, decoder_sparse_step=t.decoder_sparse_step,
                  mlp_only_layers=list(t.mlp_only_layers), norm_topk_prob=t.norm_topk_prob,
                  router_aux_loss_coef=t.router_aux_loss_coef)
    vision = {
        "model_type": "qwen3_vl_moe" if t.is_moe else "qwen3_vl", "depth": v.depth,
        "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "num_heads": v.num_heads,
        "in_channels": v.in_channels, "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size, "out_hidden_size": v.out_hidden_size,
        "num_position_embeddings": v.num_position_embeddings, "hidden_act": "gelu_pytorch_tanh",
        "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "initializer_range": 0.02,
    }
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration" if t.is_moe else "Qwen3VLForConditionalGeneration"],
        "model_type": self.model_type, "text_config": text, "vision_config": vision,
        "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": self.tie_word_embeddings,
    }

  @classmethod
  def from_pretrained(cls, path: str, **runtime) -> "ModelConfig":
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"no config.json in {path!r}")
    with open(file) as f:
      return cls.from_hf(json.load(f), **runtime)


def _check(ok: bool, field: str, message: str):
  if not ok:
    raise ValueError(f"invalid model config field {field}: {message}")


def _build(kind, values: dict[str, Any], where: str, **extra):
  names = {f.name for f in dataclasses.fields(kind)}
  unknown = set(values) - names
  if unknown:
    raise ValueError(f"unknown {where} config field(s) {sorted(unknown)}; known: {sorted(names)}")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  return kind(**values, **extra)
