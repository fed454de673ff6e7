"""DPO post-training (qwen3vl/train/dpo.py): `python train.py --config=configs/dpo.py --config.init_from=DIR
[--config.rl.pairs=PAIRS.jsonl]`. Without a pairs file the pairs are sampled on the fly: `rl.group` answers to
each training prompt, the best by `rl.rewards` chosen and the worst rejected."""
import ml_collections

from qwen3vl.configs.common import post_training_config


def get_config(arg: str = "tiny_moe"):
  tiny = arg.startswith("tiny")
  c = post_training_config(arg, "dpo")
  c.rl.pairs = ml_collections.config_dict.placeholder(str)  # JSONL {image, prompt, chosen, rejected}
  c.rl.beta = 0.1  # scale of the log-ratio margin (the KL strength to the reference)
  c.data.batch_size = c.rl.get_ref("prompts") * 2  # a chosen and a rejected row per prompt
  if not tiny:
    c.optim.lr = 5e-7
  return c
