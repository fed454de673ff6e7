"""GRPO post-training (qwen3vl/train/grpo.py): `python train.py --config=configs/grpo.py --config.init_from=DIR`,
DIR an SFT work directory or a HF Qwen3-VL directory. The default preset is the tiny MoE on the built-in synthetic
task; `configs/grpo.py:2b` (or any preset of configs/models.py) the released sizes."""
from qwen3vl.configs.common import post_training_config


def get_config(arg: str = "tiny_moe"):
  tiny = arg.startswith("tiny")
  c = post_training_config(arg, "grpo")
  c.rl.clip_eps = 0.2
  c.rl.kl_coef = 0.0  # > 0: penalty on KL(policy || the starting weights), one more forward a step
  c.data.batch_size = c.rl.get_ref("prompts") * c.rl.get_ref("group")
  c.optim.lr = 3e-4 if tiny else 1e-6
  c.optim.warmup_steps = 10 if tiny else 20
  c.train.steps = 200 if tiny else 1000
  c.train.eval_every = 50 if tiny else 100
  c.train.checkpoint_every = 50 if tiny else 100
  return c
