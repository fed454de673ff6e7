"""GRPO post-training (qwen3vl/train/grpo.py): `python train.py --config=configs/grpo.py --config.init_from=DIR`,
DIR an SFT work directory or a HF Qwen3-VL directory. The default preset is the tiny MoE on the built-in synthetic
task; `configs/grpo.py:2b` (or any preset of configs/models.py) the released sizes."""
from qwen3vl.configs.common import post_training_config


def get_config(arg: str = "tiny_moe"):
  tiny = arg.startswith("tiny")
  c = post_training_config(arg, "grpo")
  # Group scale of the advantages (policy_losses.group_advantages): mean (the expected update follows the
  # gradient of log p(right answer)), std (DeepSeekMath's GRPO), none (Dr. GRPO). On the tiny task, 15 minutes
  # from a 500-step SFT start: mean +21 points of held-out exact match, std +16 (its answers collapsed early;
  # benchmarks/RESULTS.md).
  c.rl.advantage = "mean"
  c.rl.clip_eps = 0.2
  c.rl.kl_coef = 0.0  # > 0: penalty on KL(policy || the starting weights), one more forward a step
  c.data.batch_size = c.rl.get_ref("prompts") * c.rl.get_ref("group")
  if not tiny:
    c.optim.lr = 1e-6
  return c
