"""Qwen3-VL-MoE training. `--config=configs/moe.py` = tiny MoE on the built-in synthetic data (CPU, minutes);
`--config=configs/moe.py:30b_a3b` or `:235b_a22b` = the released architectures (add --config.init_from=DIR)."""
from qwen3vl.configs.common import training_config


def get_config(arg: str = "tiny_moe"):
  return training_config(arg, tiny=arg.startswith("tiny"))
