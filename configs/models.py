"""Model presets: the released Qwen3-VL sizes and tiny ones for CPU tests.

    get_config("30b_a3b") -> ConfigDict with `vision`, `text` and top-level model fields
    qwen3vl.ModelConfig.from_dict(cfg.to_dict())

Values are those of the released config.json files (see shared/spec/qwen3vl.md, section 1). Runtime switches
(dtype, scan_layers, attention_impl, moe_impl) keep their ModelConfig defaults unless a preset sets them.
"""
import ml_collections

from qwen3vl.config import RUNTIME_FIELDS, ModelConfig

_VIT_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                  deepstack_visual_indexes=(5, 11, 17))  # 2B, 4B
_VIT_LARGE = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                  deepstack_visual_indexes=(8, 16, 24))  # 8B, 32B, MoE


def _model(vit, tie, **text):
  return dict(vision=dict(vit, out_hidden_size=text["hidden_size"]), text=text, tie_word_embeddings=tie)


def _moe(experts, top_k, moe_inter):
  return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_inter)


PRESETS = {
    "2b": _model(_VIT_SMALL, True, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, intermediate_size=6144),
    "4b": _model(_VIT_SMALL, True, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=9728),
    "8b": _model(_VIT_LARGE, False, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=12288),
    "32b": _model(_VIT_LARGE, False, hidden_size=5120, num_hidden_layers=64, num_attention_heads=64,
                  num_key_value_heads=8, intermediate_size=25600),
    "30b_a3b": _model(_VIT_LARGE, False, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                      num_key_value_heads=4, intermediate_size=6144, **_moe(128, 8, 768)),
    "235b_a22b": _model(_VIT_LARGE, False, hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                        num_key_value_heads=4, intermediate_size=12288, **_moe(128, 8, 1536)),
    # Tiny models for CPU, sized for the built-in tokenizer (qwen3vl/data/tokenizer.py: 256 bytes, the Qwen
    # special tokens from id 256, then merges; 512 ids). rope_theta 1e4 suits their short contexts: with the
    # released 5e6 and head_dim 32, neighbouring image tokens' MRoPE angles differ by at most 0.15 rad.
    "tiny": dict(
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                    num_position_embeddings=256, deepstack_visual_indexes=(0,)),
        text=dict(vocab_size=512, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, intermediate_size=256, mrope_section=(8, 4, 4),
                  rope_theta=10_000.0),
        tie_word_embeddings=True, image_token_id=262, video_token_id=263, vision_start_token_id=259,
        vision_end_token_id=260),
}
PRESETS["tiny_moe"] = dict(PRESETS["tiny"], text=dict(PRESETS["tiny"]["text"], **_moe(8, 2, 64)))


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  """Every architecture field of the preset (defaults filled in), so each can be overridden by name."""
  if arg not in PRESETS:
    raise ValueError(f"unknown model preset {arg!r}; choose one of {sorted(PRESETS)}")
  full = ModelConfig.from_dict(PRESETS[arg]).to_dict()
  return ml_collections.ConfigDict({k: v for k, v in full.items() if k not in RUNTIME_FIELDS})
