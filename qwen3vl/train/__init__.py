"""Training: optimizer, losses, checkpoints, metrics, and the trainer loop (`qwen3vl.train.trainer.train`)."""
