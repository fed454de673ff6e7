"""One training step, ours against Hugging Face transformers, on the same weights and batch (CPU, float32).

    REF=$(../shared/tools/reference-env.sh) && $REF benchmarks/train_vs_hf.py [--model dense|moe] [--rounds 6]

Ours: `qwen3vl.train.trainer.train_step` (one jitted pure function, donated state, optax AdamW with clipping).
HF: `AutoModelForImageTextToText` in train mode with its default attention (sdpa), loss from `labels`,
backward, `clip_grad_norm_` and `torch.optim.AdamW`: the loop a HF user writes. Both see the same random
checkpoint (saved by HF, loaded by `qwen3vl.hf.load_pretrained`) and the same batch: B rows of L tokens, one
224x224 image (49 tokens) per row. Ours runs in a worker process (as a user runs one framework per process:
sharing one, each framework's step ran 8-10% slower after the other's), HF in this one; the steps are timed
interleaved (HF, ours, HF, ours, ...) after a warm-up, so machine noise hits both alike, with a pause before
each (`PAUSE_S`: the other side's spinning threads stop first); the ratio of medians is the figure. The first-step losses are printed side by
side as a check that both compute the same thing. Both processes run under `qwen3vl.host_malloc`'s glibc
settings (as train.py does).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB, IMAGE, VIDEO, VSTART, VEND = 16384, 16000, 16001, 16002, 16003
LR = 1e-4
# Idle time before each timed step: torch's OpenMP threads keep spinning on the cores after a step ends, and the
# 2-core machine's next step (either framework's, in any process) would pay for it (MoE experts alone: ours
# 156 ms right after torch, 109 ms with OMP_WAIT_POLICY=PASSIVE; torch's own 112 -> 102 ms).
PAUSE_S = 0.5


def hf_config(kind: str) -> dict:
  """About 45M parameters (dense): 8 decoder layers of width 512, a 4-block vision tower of width 384."""
  text = {"vocab_size": VOCAB, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
          "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "rms_norm_eps": 1e-6,
          "hidden_act": "silu", "max_position_embeddings": 4096, "rope_theta": 5_000_000.0,
          "rope_scaling": {"rope_type": "default", "mrope_section": [12, 10, 10], "mrope_interleaved": True},
          "tie_word_embeddings": True, "attention_bias": False}
  if kind == "moe":
    text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=384, decoder_sparse_step=1,
                mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=0.001)
  vision = {"depth": 4, "hidden_size": 384, "intermediate_size": 1536, "num_heads": 6, "in_channels": 3,
            "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 512,
            "num_position_embeddings": 2304, "deepstack_visual_indexes": [1, 3], "hidden_act": "gelu_pytorch_tanh"}
  return {"model_type": "qwen3_vl_moe" if kind == "moe" else "qwen3_vl", "text_config": text,
          "vision_config": vision, "image_token_id": IMAGE, "video_token_id": VIDEO,
          "vision_start_token_id": VSTART, "vision_end_token_id": VEND, "tie_word_embeddings": True}


def make_samples(batch: int, length: int, seed: int = 0):
  """B samples of exactly `length` tokens: text, one 224x224 synthetic picture, text; loss on text targets."""
  from qwen3vl.data.datasets import Sample
  from qwen3vl.data.image import ImageProcessor
  from qwen3vl.data.synthetic import draw_scene, make_scene
  from qwen3vl.model.positions import get_rope_index
  rng = np.random.default_rng(seed)
  processor = ImageProcessor()
  samples = []
  for _ in range(batch):
    scene, _ = make_scene(rng, "count", 224)
    pixels, grid = processor([draw_scene(scene, 224)])
    n_img = int(np.prod(grid[0])) // 4
    head = rng.integers(0, 15000, 8).tolist()
    ids = head + [VSTART] + [IMAGE] * n_img + [VEND]
    ids = np.asarray(ids + rng.integers(0, 15000, length - len(ids)).tolist(), np.int32)
    targets = np.append(ids[1:], 0).astype(np.int32)
    mask = ((targets != IMAGE) & (targets != VSTART) & (targets != VEND)).astype(np.float32)
    mask[-1] = 0
    positions, _ = get_rope_index(ids[None].astype(np.int64), grid, None, image_token_id=IMAGE,
                                  video_token_id=VIDEO, vision_start_token_id=VSTART)
    samples.append(Sample(ids, targets, mask, np.asarray(positions)[:, 0].astype(np.int32), pixels, grid,
                          np.zeros((0, pixels.shape[1]), np.float32), np.zeros((0, 3), np.int64)))
  return samples


def hf_batch(samples):
  import torch
  ids = torch.tensor(np.stack([s.input_ids for s in samples]).astype(np.int64))
  labels = ids.clone()
  labels[(ids == IMAGE) | (ids == VSTART) | (ids == VEND)] = -100  # HF shifts labels itself
  return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
          "mm_token_type_ids": (ids == IMAGE).long(),  # 1 = image token (what HF's processor returns)
          "pixel_values": torch.tensor(np.concatenate([s.image_pixels for s in samples])),
          "image_grid_thw": torch.tensor(np.concatenate([s.image_grid_thw for s in samples]))}


def our_step(path: str, samples, lr: float, moe_impl: str = "blocked", scan_layers: bool = False):
  """(step(state) -> (state, loss), state): the trainer's jitted train step on the checkpoint at `path`."""
  import functools

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from qwen3vl.configs import dense
  from qwen3vl import hf
  from qwen3vl.data.packing import Packer
  from qwen3vl.train import trainer
  from qwen3vl.train.optim import make_optimizer

  config = dense.get_config("tiny")
  config.optim.lr, config.optim.warmup_steps, config.optim.weight_decay = lr, 0, 0.0
  config.optim.b2, config.optim.min_lr_ratio = 0.999, 1.0
  config.loss.aux_loss_coef = 0.001
  config.loss.z_loss_coef = 0.0  # HF adds the load-balancing loss only
  model = hf.load_pretrained(path, dtype="float32", attention_impl="xla", moe_impl=moe_impl, scan_layers=scan_layers)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tx = make_optimizer(config.optim, 1000, params)
  train_state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                 "rng": jax.random.key_data(jax.random.key(0))}
  B, L = len(samples), samples[0].length
  packer = Packer(B, L, sum(s.num_patches for s in samples), pack=False, patch_dim=samples[0].image_pixels.shape[1],
                  image_token_id=IMAGE, video_token_id=VIDEO,
                  num_position_embeddings=model.config.vision.num_position_embeddings)
  batch, = packer.pack_all(samples)
  batch = jax.device_put(batch)
  fn = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx, config=config), donate_argnums=0)

  def step(s):
    s, metrics = fn(s, batch)
    return s, float(metrics["loss"])
  return step, train_state


def worker(args):
  """Our side, in its own process: builds the step on the checkpoint at args.worker, then runs one step per
  line read from stdin and answers with its wall time and loss (JSON), until stdin closes."""
  import json

  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  step, state = our_step(args.worker, make_samples(args.batch, args.length), LR, args.moe_impl,
                         bool(args.scan_layers))
  print(json.dumps({"device": f"jax {jax.__version__} ({jax.devices()[0].device_kind})"}), flush=True)
  for _ in sys.stdin:
    t0 = time.perf_counter()
    state, loss = step(state)
    print(json.dumps({"s": time.perf_counter() - t0, "loss": loss}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", choices=["dense", "moe"], default="dense")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--moe_impl", default="blocked", help="ours: blocked (the CPU overlay's), ragged or dense")
  parser.add_argument("--scan_layers", type=int, default=0, help="ours: 0 = layers unrolled (the CPU overlay's: "
                      "no copies in and out of the scan's stacked buffers), 1 = in a scan (the GPU/TPU overlay's)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run our side on this checkpoint
  args = parser.parse_args()
  if args.worker:
    return worker(args)

  import json
  import subprocess

  import torch
  from transformers import AutoConfig, AutoModelForImageTextToText
  torch.manual_seed(0)
  d = hf_config(args.model)
  hf_model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(d.pop("model_type"), **d)).float()
  hf_model.train()
  n_params = sum(p.numel() for p in hf_model.parameters())
  samples = make_samples(args.batch, args.length)
  with tempfile.TemporaryDirectory() as tmp:
    hf_model.save_pretrained(tmp)
    flags = [f"--{k}={getattr(args, k)}" for k in ("model", "batch", "length", "moe_impl", "scan_layers")]
    ours = subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--worker={tmp}", *flags],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def our_step_s():
      ours.stdin.write("step\n")
      ours.stdin.flush()
      reply = json.loads(ours.stdout.readline())
      return reply["s"], reply["loss"]
    device = json.loads(ours.stdout.readline())["device"]  # the worker has loaded the checkpoint
  batch = hf_batch(samples)
  opt = torch.optim.AdamW(hf_model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

  def hf_step():
    out = hf_model(**batch, output_router_logits=args.model == "moe")
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss)

  print(f"{args.model} model (ours: moe_impl={args.moe_impl}, scan_layers={bool(args.scan_layers)}), "
        f"{n_params / 1e6:.1f}M parameters; batch {args.batch} x {args.length} tokens, one "
        f"224x224 image per row; {device}, torch {torch.__version__} ({torch.get_num_threads()} threads)",
        flush=True)
  compile_s, our_loss = our_step_s()
  hf_loss = hf_step()
  print(f"first-step loss: ours {our_loss:.6f}, HF {hf_loss:.6f}; our compile + first step {compile_s:.1f} s",
        flush=True)
  times = {"hf": [], "ours": []}
  for r in range(args.rounds):
    time.sleep(PAUSE_S)
    t0 = time.perf_counter()
    hf_step()
    times["hf"].append(time.perf_counter() - t0)
    time.sleep(PAUSE_S)
    times["ours"].append(our_step_s()[0])
    print(f"round {r}: HF {times['hf'][-1]:.3f} s, ours {times['ours'][-1]:.3f} s", flush=True)
  ours.stdin.close()
  ours.wait()
  hf_s, our_s = np.median(times["hf"]), np.median(times["ours"])
  tokens = args.batch * args.length
  print(f"\n| step | HF transformers | ours | ratio |\n|---|---|---|---|\n"
        f"| s / step (median of {args.rounds}) | {hf_s:.3f} | {our_s:.3f} | {hf_s / our_s:.2f}x |\n"
        f"| tokens / s | {tokens / hf_s:.0f} | {tokens / our_s:.0f} | |")


if __name__ == "__main__":
  from qwen3vl.host_malloc import reexec_with_tuned_malloc
  reexec_with_tuned_malloc()  # the same glibc settings for both frameworks (the worker inherits them)
  main()
