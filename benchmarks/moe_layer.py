"""The MoE experts alone, forward + backward: ours (the CPU's blocked experts) against HF transformers' experts.

    REF=$(../shared/tools/reference-env.sh) && $REF benchmarks/moe_layer.py [--tokens 2048] [--rounds 10]

The experts of train_vs_hf.py's MoE (512 -> 2 x 384 -> 512, 8 experts, top-2) on the same random tokens, routing,
weights and output cotangent: ours is `experts.expert_layout` + `blocked_experts` + the weighted sum (what
`MoE._routed` runs with moe_impl=blocked), jitted, with the routing as an argument; HF's is
`Qwen3VLMoeTextExperts` with its `grouped_mm` and `eager` implementations, loss.backward(). Timed interleaved,
with train_vs_hf's pause before each call; medians. The routed rows and gradients are checked against each other first.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.train_vs_hf import PAUSE_S, hf_config  # noqa: E402  (why the pause: there)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--rounds", type=int, default=10)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import torch
  from transformers import AutoConfig
  from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

  from qwen3vl.model.experts import block_rows, blocked_experts, expert_layout, from_layout, to_layout
  jax.config.update("jax_default_matmul_precision", "highest")
  text = hf_config("moe")["text_config"]
  t, h, i = args.tokens, text["hidden_size"], text["moe_intermediate_size"]
  e, k = text["num_experts"], text["num_experts_per_tok"]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((t, h), np.float32)
  gate_up = (rng.standard_normal((e, h, 2 * i)) * 0.02).astype(np.float32)
  down = (rng.standard_normal((e, i, h)) * 0.02).astype(np.float32)
  logits = rng.standard_normal((t, e))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ids = np.argsort(-probs, -1)[:, :k].astype(np.int32)
  weights = np.take_along_axis(probs, ids, -1)
  weights = (weights / weights.sum(-1, keepdims=True)).astype(np.float32)
  cotangent = rng.standard_normal((t, h)).astype(np.float32)
  block = block_rows(t * k, e, h, 2 * i)

  def ours_loss(x, gate_up, down, weights, ids):
    layout = expert_layout(ids, e, block)
    out = blocked_experts(to_layout(x, layout), gate_up, down, layout, block)
    return jnp.vdot(jnp.einsum("tkh,tk->th", from_layout(out, layout), weights), cotangent)
  ours_grad = jax.jit(jax.value_and_grad(ours_loss, argnums=(0, 1, 2, 3)))

  on_device = [jnp.asarray(a) for a in (x, gate_up, down, weights, ids)]

  def ours():
    return jax.block_until_ready(ours_grad(*on_device))

  def hf(impl):
    cfg = AutoConfig.for_model("qwen3_vl_moe_text", hidden_size=h, moe_intermediate_size=i, num_experts=e,
                               num_experts_per_tok=k)
    cfg._experts_implementation = impl
    experts = Qwen3VLMoeTextExperts(cfg)
    with torch.no_grad():  # HF stores [E, 2I, H] and [E, H, I]
      experts.gate_up_proj.copy_(torch.tensor(gate_up.transpose(0, 2, 1)))
      experts.down_proj.copy_(torch.tensor(down.transpose(0, 2, 1)))
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(weights, requires_grad=True)

    def step():
      for p in (xt, wt, *experts.parameters()):
        p.grad = None
      loss = (experts(xt, torch.tensor(ids.astype(np.int64)), wt) * torch.tensor(cotangent)).sum()
      loss.backward()
      return float(loss), xt.grad.detach().numpy(), experts.gate_up_proj.grad.detach().numpy().transpose(0, 2, 1)
    return step

  sides = {"ours (blocked)": ours, "HF grouped_mm": hf("grouped_mm"), "HF eager": hf("eager")}
  (loss, (dx, d_gate_up, _, _)), (hf_loss, hf_dx, hf_d_gate_up) = ours(), sides["HF grouped_mm"]()
  scale = lambda a: float(np.abs(a).max())
  print(f"{t} tokens x top-{k} over {e} experts, {h} -> 2 x {i} -> {h}, block {block}; jax {jax.__version__}, "
        f"torch {torch.__version__}; loss ours {float(loss):.6f}, HF {hf_loss:.6f}; max |dx| diff / max "
        f"{scale(np.asarray(dx) - hf_dx) / scale(hf_dx):.1e}, d gate_up {scale(np.asarray(d_gate_up) - hf_d_gate_up) / scale(hf_d_gate_up):.1e}",
        flush=True)
  times = {name: [] for name in sides}
  for _ in range(args.rounds):
    for name, fn in sides.items():
      time.sleep(PAUSE_S)
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  base = np.median(times["HF grouped_mm"])
  print("\n| experts fwd+bwd | ms (median) | HF grouped_mm / this |\n|---|---|---|")
  for name, ts in times.items():
    print(f"| {name} | {np.median(ts) * 1e3:.1f} | {base / np.median(ts):.2f}x |")


if __name__ == "__main__":
  from qwen3vl.host_malloc import reexec_with_tuned_malloc
  reexec_with_tuned_malloc()
  main()
