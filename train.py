"""Train Qwen3-VL: `python train.py --config=configs/moe.py [--config.train.steps=200] [--workdir=DIR]`.

Flags -> config -> qwen3vl.train.trainer.train. Every config field can be overridden on the command line;
the resolved config is printed and saved in the work directory, next to checkpoints and metrics.jsonl.
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moe.py", "Training config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Checkpoints, metrics and the resolved config go here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO
  from qwen3vl.train.trainer import train
  result = train(_CONFIG.value, _WORKDIR.value)
  if result:
    print("final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
  from qwen3vl.host_malloc import reexec_with_tuned_malloc
  reexec_with_tuned_malloc()
  app.run(main)
