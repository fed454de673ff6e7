"""Qwen3-VL dense training. `--config=configs/dense.py` = tiny dense model on the built-in synthetic data;
`--config=configs/dense.py:2b` (4b, 8b, 32b) = the released architectures (add --config.init_from=DIR)."""
from qwen3vl.configs.common import training_config


def get_config(arg: str = "tiny"):
  return training_config(arg, tiny=arg.startswith("tiny"))
