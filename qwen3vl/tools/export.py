"""Export a train.py work directory (its newest checkpoint) for Hugging Face tools.

    python -m qwen3vl.tools.export --checkpoint=WORKDIR --merged=OUT_DIR [--dtype=bfloat16]
    python -m qwen3vl.tools.export --checkpoint=WORKDIR --peft=OUT_DIR

--merged: a plain Qwen3-VL directory (config.json, safetensors, the run's tokenizer.json) for transformers, vLLM or
`hf.load_pretrained`, with a LoRA run's adapters folded in (w + alpha / r * A B, over the dequantized base when the
run held it as int8 / nf4), in the run's parameter dtype unless --dtype says otherwise.
--peft: a LoRA run's adapters alone in PEFT's format (qwen3vl/peft.py), for `peft.PeftModel.from_pretrained` on the
base the run started from (adapter_config.json names it). A QLoRA run's adapters were trained against the quantized
base; on the full-precision base they are what QLoRA's PEFT adapters always are: close, not equal.
"""
from __future__ import annotations

import argparse
import os
import shutil

import numpy as np

from qwen3vl import peft
from qwen3vl.train import adapters, init_from


def merged(workdir: str, out: str, dtype: str | None = None) -> str:
  """Write the run's weights, adapters merged, as a HF directory; returns the dtype written."""
  import jax.numpy as jnp
  from flax import nnx
  from qwen3vl import hf
  from qwen3vl.model.vlm import Qwen3VL
  cfg, params, _ = init_from.workdir_params(workdir)
  dtype = dtype or cfg.param_dtype
  cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))
  params = adapters.conform(params, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, _cast(params, jnp.dtype(dtype)))  # host arrays: nothing goes to a device
  hf.save_pretrained(nnx.merge(graphdef, state), out)
  if (tokenizer := init_from.tokenizer_file(workdir)) is not None:
    shutil.copy(tokenizer, os.path.join(out, "tokenizer.json"))
  return dtype


def peft_adapters(workdir: str, out: str) -> str | None:
  """Write a LoRA run's adapters as a PEFT directory; returns the base they go on (the run's init_from)."""
  if not init_from.run_config(workdir).lora_rank:
    raise ValueError(f"--peft: {workdir} is a full fine-tuning run (lora_rank 0 in model_config.json), it has no "
                     f"adapters to export; use --merged")
  cfg, params, base, _ = init_from.restore(workdir)
  trained = adapters.conform(params, adapters.split(init_from.abstract_params(cfg), cfg)[0])
  peft.save_adapters(trained, cfg, out, base_model_name_or_path=base.get("init_from"))
  return base.get("init_from")


def _cast(tree: dict, dtype) -> dict:
  return {k: _cast(v, dtype) if isinstance(v, dict) else np.asarray(v).astype(dtype) for k, v in tree.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="a train.py work directory")
  parser.add_argument("--merged", help="output directory of the merged Hugging Face model")
  parser.add_argument("--peft", help="output directory of the PEFT adapters (LoRA runs)")
  parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                      help="dtype of the merged weights (default: the run's parameter dtype)")
  args = parser.parse_args(argv)
  if not (args.merged or args.peft):
    parser.error("give --merged=DIR and/or --peft=DIR")
  if not os.path.isdir(args.checkpoint):
    parser.error(f"--checkpoint {args.checkpoint!r} is not a directory")
  if not init_from.is_workdir(args.checkpoint):
    parser.error(f"--checkpoint {args.checkpoint!r} is not a train.py work directory (no model_config.json)")
  try:
    if args.peft:
      base = peft_adapters(args.checkpoint, args.peft)
      print(f"PEFT adapters written to {args.peft} (base_model_name_or_path: {base})")
      if base and init_from.is_workdir(base):
        print(f"note: the base {base} is a train.py work directory; export it with --merged and load the "
              f"adapters onto that")
    if args.merged:
      dtype = merged(args.checkpoint, args.merged, args.dtype)
      print(f"merged {dtype} model written to {args.merged}")
  except (ValueError, FileNotFoundError) as e:  # bad input: the message names it
    parser.exit(2, f"export: error: {e}\n")


if __name__ == "__main__":
  main()
