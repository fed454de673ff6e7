"""GRPO post-training (qwen3vl/train/grpo.py): `python train.py --config=configs/grpo.py --config.init_from=DIR`,
DIR an SFT work directory or a HF Qwen3-VL directory. The default preset is the tiny MoE on the built-in synthetic
task; `configs/grpo.py:2b` (or any preset of configs/models.py) the released sizes."""
import ml_collections

from qwen3vl.configs.common import training_config


def get_config(arg: str = "tiny_moe"):
  tiny = arg.startswith("tiny")
  c = training_config(arg, tiny=tiny)
  patches_per_row = c.data.max_patches // c.data.batch_size  # SFT's vision budget per row
  c.rl = ml_collections.ConfigDict()
  c.rl.algorithm = "grpo"
  c.rl.rewards = "exact_match"  # names registered in qwen3vl/train/rewards.py, comma-separated: summed
  c.rl.prompts = 4 if tiny else 16  # prompts per step
  c.rl.group = 8  # answers sampled per prompt (G)
  c.rl.updates = 2  # updates per rollout (the first is on-policy; later ones clip the ratio)
  c.rl.max_new_tokens = 8 if tiny else 256  # the synthetic answers are a word and <|im_end|>
  c.rl.temperature = 1.0
  c.rl.top_p = 1.0
  c.rl.clip_eps = 0.2
  c.rl.kl_coef = 0.0  # > 0: penalty on KL(policy || the starting weights), one more forward a step
  # One answer a row: the batch is prompts x group rows with SFT's vision budget per row.
  c.data.pack = False
  if tiny:
    c.data.max_length = 48  # the synthetic prompts are 18-24 tokens, + 8 answer tokens
  c.data.batch_size = c.rl.get_ref("prompts") * c.rl.get_ref("group")
  c.data.max_patches = c.data.get_ref("batch_size") * patches_per_row
  c.optim.lr = 3e-4 if tiny else 1e-6
  c.optim.warmup_steps = 10 if tiny else 20
  c.train.steps = 200 if tiny else 1000
  c.train.eval_every = 50 if tiny else 100
  c.train.checkpoint_every = 50 if tiny else 100
  c.train.log_every = 5
  return c
