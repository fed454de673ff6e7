"""Qwen3-VL-MoE sparse block: softmax router, top-k, renormalised weights, no shared expert.

Three paths, one numeric definition: "ragged" (dropless: the token copies are sorted by expert and the experts
run as `jax.lax.ragged_dot`, so compute follows the routed load), "blocked" (each expert's copies padded to whole blocks
of `experts.block_rows` rows, `experts.blocked_experts` a loop over the used blocks: for XLA:CPU, whose ragged_dot
runs every expert on every row) and "dense" (every expert on every token, weighted by a scattered weight
matrix; the reference the tests compare against). Expert weights use the
released checkpoint layout: gate_up [E, H, 2I] (gate first), down [E, I, H].

On a mesh (under `jax.set_mesh`, as the train step runs) the ragged path is a `shard_map` over the batch axes:
each device routes its own tokens (no global sort), FSDP gathers the weights, and with an `expert` axis of size
n each device holds E/n experts. `moe_dispatch="all_to_all"` (the default) sends each token copy once to the
device of its expert and back (model/expert_exchange.py: a ragged all-to-all on GPU/TPU, a padded dense one on
CPU); the receive buffer is static: dropless it has room for everything the group can send one device (n x the
local tokens x min(k, E/n)), with `moe_capacity_factor` c it holds c x the local copies and the overflow is
dropped (counted: the `moe/dropped` metric). "all_gather" gathers every copy of the expert group on every device
and reduce-scatters the sums. Measured on the released sizes (README, "Expert parallelism at pod scale"): dropless,
the all-to-all moves k/n of the all-gather's bytes (1/8 at expert=64, top-8) but holds a little more (its receive buffer is one more
[rows, H] array); the capacity factor is what makes the expert group's activations O(local copies) instead of
O(n x local copies). all_gather stays for n <= k, where it moves no more bytes and holds less. With a `tensor`
axis the experts' MLP width is split over it too (gate and up alike) and the partial sums are added (psum).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwen3vl.config import ModelConfig
from qwen3vl.model import expert_exchange
from qwen3vl.model.experts import block_rows, blocked_experts, expert_layout, from_layout, swiglu, to_layout
from qwen3vl.model.layers import param, quantizable, weight_value
from qwen3vl.model.lora import LoRA
from qwen3vl.model.remat import tag as checkpoint_tag
from qwen3vl.sharding import BATCH


def ragged_dot(x, w, group_sizes):
  """`jax.lax.ragged_dot` with its precision pinned by the dtype: XLA:TPU runs it as a Mosaic kernel, which
  rejects bfloat16 operands at the fp32 precision a global `jax_default_matmul_precision="highest"` asks for
  (found compiling the MoE train step for TPU v5e); float32 keeps the highest precision."""
  precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  return jax.lax.ragged_dot(x, w, group_sizes, precision=precision)


# The grouped matmul of the ragged path (a module attribute so the compile tool can swap in a stand-in of the
# same shapes on cpu:N: XLA:CPU expands ragged_dot to every expert, XLA:TPU lowers it to a grouped matmul; XLA:GPU
# of jax 0.10.2 expands it too, found compiling for H100).
grouped_matmul = ragged_dot


class MoE(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    t = cfg.text
    e, h, i = t.num_experts, t.hidden_size, t.moe_intermediate_size
    self.router = param(rngs, (h, e), ("embed", None), cfg.param_dtype)
    shapes = {"gate_up": ((e, h, 2 * i), ("experts", "embed", "mlp")),
              "down": ((e, i, h), ("experts", "mlp", "embed"))}
    lora = cfg.lora_spec
    self.gate_up, self.gate_up_scale = quantizable(rngs, *shapes["gate_up"], cfg.param_dtype, cfg.base_quant)
    self.down, self.down_scale = quantizable(rngs, *shapes["down"], cfg.param_dtype, cfg.base_quant)
    self.gate_up_lora, self.down_lora = (
        LoRA(*shapes[w], lora, rngs) if lora is not None and f"moe_{w}" in lora.targets else None
        for w in ("gate_up", "down"))
    self.top_k, self.dtype, self.impl = t.num_experts_per_tok, cfg.precision_of("decoder")[0], cfg.moe_impl
    self.dispatch, self.capacity_factor = cfg.moe_dispatch, cfg.moe_capacity_factor

  def route(self, x: jax.Array):
    """x [T, H] -> (router logits [T, E], top-k weights [T, k] in the activation dtype, expert ids [T, k])."""
    logits = x @ self.router[...].astype(self.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, self.top_k)
    weights = weights / weights.sum(-1, keepdims=True)  # HF always renormalises the top-k
    return logits, weights.astype(self.dtype), experts

  def __call__(self, x: jax.Array, valid: jax.Array | None = None):
    """x [..., H], valid [...] (False: padding, whose output no one reads; the all-to-all does not send it) ->
    (y [..., H], router logits [tokens, E], fraction of the valid token copies dropped for want of room)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).astype(self.dtype)
    valid = jnp.ones(x.shape[:1], bool) if valid is None else valid.reshape(-1)
    logits, weights, experts = self.route(x)
    if self.impl == "dense":
      y, dropped = self._dense(x, weights, experts), jnp.zeros((), jnp.float32)
    else:
      y, dropped = self._ragged(x, valid, weights, experts)
    return y.reshape(shape), logits, dropped

  def expert_weights(self):
    """(gate_up, down) in the compute dtype: dequantized when held as codes, LoRA adapters merged in."""
    out = []
    for w, scale, lora in ((self.gate_up, self.gate_up_scale, self.gate_up_lora),
                           (self.down, self.down_scale, self.down_lora)):
      value = weight_value(w, scale, self.dtype)
      out.append(value if lora is None else lora.merged(value))
    return tuple(out)

  def _ragged(self, x, valid, weights, experts):
    gate_up, down = self.expert_weights()
    none_dropped = jnp.zeros((), jnp.float32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return self._routed(x, weights, experts, gate_up, down, 0), none_dropped
    batch_axes, expert_axis, tensor_axis = mesh_axes(mesh, *down.shape[:2])
    if not batch_axes and tensor_axis is None:
      return self._routed(x, weights, experts, gate_up, down, 0), none_dropped
    if x.shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
      raise ValueError(f"MoE: {x.shape[0]} tokens do not split over the batch axes {batch_axes} of {mesh}")
    tokens = P(batch_axes or None)
    # Experts over `expert`, their MLP width over `tensor` (gate and up split alike: [E, H, 2, I] then back), whole
    # over fsdp (shard_map's input gathers them).
    gate_up = gate_up.reshape(gate_up.shape[:2] + (2, -1))
    specs = (P(expert_axis, None, None, tensor_axis), P(expert_axis, tensor_axis))

    def local(x, valid, weights, experts, gate_up, down):
      gate_up = gate_up.reshape(gate_up.shape[:2] + (-1,))
      dropped = jnp.zeros((), jnp.float32)
      if expert_axis is None:
        y = self._routed(x, weights, experts, gate_up, down, 0)
      elif self.dispatch == "all_to_all":
        y, dropped = self._exchanged(x, valid, weights, experts, gate_up, down, expert_axis,
                                     mesh.shape[expert_axis])
      else:
        gather = lambda a: jax.lax.all_gather(a, expert_axis, tiled=True)
        first = jax.lax.axis_index(expert_axis) * gate_up.shape[0]
        y = self._routed(gather(x), gather(weights), gather(experts), gate_up, down, first)
        y = jax.lax.psum_scatter(y, expert_axis, tiled=True)
      if tensor_axis:  # each tensor shard summed its slice of the MLP width
        y = jax.lax.psum(y, tensor_axis)
      copies = valid.sum(dtype=jnp.float32) * experts.shape[1]
      if batch_axes:
        dropped, copies = jax.lax.psum((dropped, copies), batch_axes)
      return y, dropped / jnp.maximum(copies, 1.0)

    return jax.shard_map(local, mesh=mesh, in_specs=(tokens,) * 4 + specs,
                         out_specs=(tokens, P()))(x, valid, weights, experts, gate_up, down)

  def _exchanged(self, x, valid, weights, experts, gate_up, down, axis: str, n: int):
    """Each valid token copy sent once to the device of its expert (model/expert_exchange.py), run there, sent
    back; returns (y, copies dropped for want of room at their receiver). Padding is not sent (its y is 0)."""
    from qwen3vl.kernels.target import target_platform
    transport = "ragged" if target_platform() in ("tpu", "gpu") else "dense"
    t, k = experts.shape
    per_shard = gate_up.shape[0]
    flat = experts.reshape(-1)
    capacity = self.receive_capacity(t, k, per_shard, n)
    p = expert_exchange.plan(jnp.where(jnp.repeat(valid, k), flat // per_shard, n), n, axis, capacity)
    rows = jnp.take(x, p.order // k, axis=0)
    # expert ids travel shifted by one, so the zeros after the received rows mean "no expert" (dropped below)
    ids = expert_exchange.send(flat[p.order] % per_shard + 1, p, capacity, axis, transport) - 1
    received = expert_exchange.send(rows, p, capacity, axis, transport)
    ids = jnp.where(ids < 0, per_shard, ids)[:, None]
    out = self._routed(received, jnp.ones(ids.shape, received.dtype), ids, gate_up, down, 0)
    back = expert_exchange.receive(out, p, t * k, axis, transport)
    copies = jnp.zeros_like(back).at[p.order].set(back)  # sorted position -> its copy
    return jnp.einsum("tkh,tk->th", copies.reshape(t, k, -1), weights), p.dropped.astype(jnp.float32)

  def receive_capacity(self, tokens: int, k: int, per_shard: int, n: int) -> int:
    """Rows a device's receive buffer holds. Dropless: the most the n devices of the expert group can send it,
    each token at most min(k, experts per shard) copies (its k experts are distinct: at expert=64 with 2 experts a
    shard, 2 of top-8). With a capacity factor c: c x the device's own copies (the mean load), rounded up to 8."""
    dropless = n * tokens * min(k, per_shard)
    if not self.capacity_factor:
      return dropless
    return min(dropless, -(-math.ceil(self.capacity_factor * tokens * k) // 8) * 8)

  def _routed(self, x, weights, experts, gate_up, down, first):
    """Token copies routed to experts first..first+len(gate_up)-1, in the experts' layout (experts.py); copies
    for other experts get no row and add nothing."""
    if self.impl == "blocked":
      block = block_rows(experts.size, gate_up.shape[0], *gate_up.shape[1:])
      layout = expert_layout(experts - first, gate_up.shape[0], block)
      out = checkpoint_tag(blocked_experts(to_layout(x, layout), gate_up, down, layout, block), "moe_down")
    else:
      layout = expert_layout(experts - first, gate_up.shape[0])
      h = checkpoint_tag(grouped_matmul(to_layout(x, layout), gate_up, layout.group_sizes), "moe_gate_up")
      out = checkpoint_tag(grouped_matmul(swiglu(h), down, layout.group_sizes), "moe_down")
    return jnp.einsum("tkh,tk->th", from_layout(out, layout), weights)

  def _dense(self, x, weights, experts):
    gate_up, down = self.expert_weights()
    scatter = jnp.zeros((x.shape[0], gate_up.shape[0]), self.dtype)
    scatter = scatter.at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
    h = checkpoint_tag(jnp.einsum("th,ehi->eti", x, gate_up), "moe_gate_up")
    y = jnp.einsum("eti,eih->eth", swiglu(h), down)
    y = checkpoint_tag(y, "moe_down")
    return jnp.einsum("eth,te->th", y, scatter)


def mesh_axes(mesh, num_experts: int, width: int) -> tuple[tuple[str, ...], str | None, str | None]:
  """(the batch axes the tokens split over, "expert" if the experts split over it, "tensor" if each expert's MLP
  width does): an axis of size 1, or one that does not divide, is not used."""
  batch_axes = tuple(a for a in BATCH if mesh.shape[a] > 1)
  expert_axis = "expert" if mesh.shape["expert"] > 1 and num_experts % mesh.shape["expert"] == 0 else None
  tensor_axis = "tensor" if mesh.shape["tensor"] > 1 and width % mesh.shape["tensor"] == 0 else None
  return batch_axes, expert_axis, tensor_axis


def describe(cfg: ModelConfig, mesh, platform: str) -> str:
  """One line on how the MoE layers run on `mesh` for `platform` (train.py's log, the compile tool's report)."""
  t = cfg.text
  if cfg.moe_impl == "dense":
    return f"moe: dense reference path ({t.num_experts} experts on every token)"
  axes, expert_axis, tensor_axis = mesh_axes(mesh, t.num_experts, t.moe_intermediate_size)
  axes, n, tensor = list(axes), mesh.shape["expert"], mesh.shape["tensor"]
  parts = []
  if expert_axis:
    if cfg.moe_dispatch == "all_to_all":
      transport = "ragged_all_to_all" if platform in ("tpu", "gpu") else "padded dense all_to_all (CPU)"
      room = (f"capacity {cfg.moe_capacity_factor:g} x the local copies (overflow dropped)"
              if cfg.moe_capacity_factor else "dropless")
      parts.append(f"all_to_all over expert={n} ({transport}, {room})")
    else:
      parts.append(f"all_gather over expert={n} (every copy of the expert group on each device)")
    parts.append(f"{t.num_experts // n} experts per device")
  elif axes:
    parts.append("every expert on every device")
  if tensor_axis:
    parts.append(f"expert MLP width over tensor={tensor}")
  # What the compilers make of ragged_dot (jax 0.10.2): XLA:TPU a grouped-matmul kernel, XLA:GPU and XLA:CPU every
  # expert over every token copy (found in the optimized HLO: [experts, copies, width] masks).
  lowered = {"tpu": "a grouped-matmul kernel", "gpu": "expanded to every expert by XLA:GPU",
             "cpu": "expanded to every expert by XLA:CPU"}.get(platform, "")
  how = f"jax.lax.ragged_dot ({lowered})" if cfg.moe_impl == "ragged" else "blocked experts (model/experts.py)"
  where = f"shard_map over {axes or ['tensor']}: " + ", ".join(parts) if parts else "one device"
  return f"moe: {cfg.moe_dispatch if n > 1 else cfg.moe_impl}: {how}; {where}; {t.num_experts} experts, top " \
         f"{t.num_experts_per_tok}"
