"""LoRA adapters: y = x W + (alpha / r) * dropout(x) A B, with A [in, r] and B [r, out] (B starts at zero).

Why our own module and not qwix's LoRA provider: qwix adds adapters by intercepting `dot_general` / `einsum`
while it traces the model, creating the parameters during that call; our decoder and vision stacks are built
with `nnx.vmap` and run under `nnx.scan` + `nnx.remat`, the MoE experts run as `ragged_dot` or a custom-VJP
blocked loop (which qwix's LoRA does not reach), and the trainer keeps parameters as pure dicts. So the adapter is
a small module beside `Linear` (`Linear(..., lora=spec)`) and beside the expert weights (`MoE`), named by the
remat tags (`TARGETS`), stacked over layers like the weight it adapts. Adapter parameters are
`nnx.LoRAParam`s, always float32, and their pure-dict key is `<weight>_lora` (`kernel_lora`, `gate_up_lora`):
`is_adapter(path)` is how the trainer tells them from the frozen base.

Experts are adapted per expert (A [E, H, r], B [E, r, out]) through the merged weight W + s A B of the layer (one
layer's expert weights, which the forward holds anyway), so every MoE path (ragged, blocked, dense) runs
unchanged; dropout does not apply there. Dropout elsewhere takes its key from `dropout_key(key)` around the
traced loss: each adapted matmul folds in its own call number, so under `scan_layers` the layers of a stack
share one mask per projection (unrolled layers, the CPU default, get their own).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

# Adaptable weights by name (the remat tags of model/remat.py, plus the vision mergers' two linears).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up", "mlp_down", "moe_gate_up", "moe_down",
           "vision_qkv", "vision_proj", "vision_fc1", "vision_fc2", "merger")
GROUPS = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("mlp_gate", "mlp_up", "mlp_down"),
          "experts": ("moe_gate_up", "moe_down"), "vision": ("vision_qkv", "vision_proj", "vision_fc1", "vision_fc2")}
GROUPS.update(llm=GROUPS["attention"] + GROUPS["mlp"] + GROUPS["experts"], all=TARGETS)
SUFFIX = "_lora"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float
  dropout: float
  targets: tuple[str, ...]

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def parse_targets(spec: str | tuple[str, ...]) -> tuple[str, ...]:
  """'attention,mlp_down' (names of TARGETS or GROUPS) -> the target names in TARGETS order; unknown names raise."""
  items = spec.split(",") if isinstance(spec, str) else spec
  chosen = set()
  for item in filter(None, (s.strip() for s in items)):
    if item in GROUPS:
      chosen.update(GROUPS[item])
    elif item in TARGETS:
      chosen.add(item)
    else:
      raise ValueError(f"LoRA target {item!r} is unknown; targets: {', '.join(TARGETS)}; groups: "
                       f"{', '.join(GROUPS)}")
  return tuple(t for t in TARGETS if t in chosen)


def is_adapter(path: tuple[str, ...]) -> bool:
  """Whether a parameter path (pure-dict keys) lies inside a LoRA adapter."""
  return any(str(k).endswith(SUFFIX) for k in path)


class LoRA(nnx.Module):
  """A [..., in, r] and B [..., r, out] of a weight [..., in, out]; `axes` are the weight's logical axes."""

  def __init__(self, shape: tuple[int, ...], axes, spec: LoraSpec, rngs: nnx.Rngs):
    *lead, d_in, d_out = shape
    bound = 1.0 / d_in**0.5  # PEFT's kaiming_uniform(a=sqrt(5)) on A
    a = jax.random.uniform(rngs.params(), (*lead, d_in, spec.rank), jnp.float32, -bound, bound)
    self.a = nnx.LoRAParam(a, out_sharding=(*axes[:-1], None), eager_sharding=False)
    self.b = nnx.LoRAParam(jnp.zeros((*lead, spec.rank, d_out), jnp.float32),
                           out_sharding=(*axes[:-2], None, axes[-1]), eager_sharding=False)
    self.scale, self.dropout = spec.scale, spec.dropout

  def delta(self, x: jax.Array, matmul) -> jax.Array:
    """s * dropout(x) A B for x [..., in] (one weight, no leading axes), through `matmul(x, w)`."""
    if self.dropout > 0 and (key := _next_key()) is not None:
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    return matmul(matmul(x, self.a[...].astype(x.dtype)), self.b[...].astype(x.dtype)) * self.scale

  def merged(self, w: jax.Array) -> jax.Array:
    """w + s A B (w [..., in, out]: leading axes as the adapter's), in w's dtype."""
    ab = jnp.matmul(self.a[...], self.b[...], precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + self.scale * ab).astype(w.dtype)


# ------------------------------------------------------------------------------------------------- dropout
_KEY = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def dropout_key(key: jax.Array | None):
  """LoRA dropout is active (with this key) while the loss is traced inside this context; None = off."""
  token = _KEY.set(None if key is None else [key, 0])
  try:
    yield
  finally:
    _KEY.reset(token)


def _next_key():
  state = _KEY.get()
  if state is None:
    return None
  state[1] += 1
  return jax.random.fold_in(state[0], state[1])
