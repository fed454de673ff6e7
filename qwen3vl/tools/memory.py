"""Will a training run fit? Per-device memory of the train step, from the compiler, before renting hardware.

    python -m qwen3vl.tools.memory --config=configs/moe.py:30b_a3b --devices=8 --config.mesh.fsdp=8
    python -m qwen3vl.tools.memory --config=configs/dense.py:2b --devices=8 --remat=full,minimal --hbm_gib=80
    python -m qwen3vl.tools.memory --config=configs/moe.py --saved      # what each preset keeps per layer

A remat-preset sweep over `qwen3vl.tools.compile`'s train program (one way to build the abstract state and
compile: `compile.build_train`): for `--devices` simulated CPU devices with the `--target` hardware overlay
(default gpu: bfloat16 compute, ragged MoE), once per remat preset; nothing is allocated. For the real TPU / GPU
compilers, use `python -m qwen3vl.tools.compile --target=v5e:2x4|h100:8 --config.model.remat=...`. Parameters,
optimizer state and the batch are counted from their shardings, temporaries come from the compiled module's memory
analysis. XLA:CPU drops host-offload annotations, so for `minimal_offload` the tensors the policy sends to pinned
host memory (counted per layer with `jax.ad_checkpoint.saved_residuals`) are subtracted from the temporaries: that
row is an estimate. XLA:CPU also expands `ragged_dot` to every expert ([experts, tokens, ...] temporaries) where
XLA:TPU runs a grouped matmul, so the ragged MoE path is compiled with the compile tool's stand-in of the same
shapes (`compile.grouped_matmul_as_on_accelerators`; XLA:GPU expands it like XLA:CPU, see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re

# The partitioner's C++ warnings (reshards it had to insert) would bury the table; train.py still shows them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import jax  # noqa: E402
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from qwen3vl.tools import compile as compile_tool

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moe.py", "Training config file[:preset].")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated devices (the mesh in --config.mesh must use them all).")
_REMAT = flags.DEFINE_list("remat", ["none", "full", "dots_with_no_batch_dims", "minimal", "minimal_offload"],
                           "Remat presets to compile (the vision tower gets the same preset).")
_TARGET = flags.DEFINE_enum("target", "gpu", ["cpu", "gpu", "tpu"], "Hardware overlay (dtypes, MoE path).")
_HBM = flags.DEFINE_float("hbm_gib", 80.0, "Device memory for the verdict, GiB.")
_SAVED = flags.DEFINE_bool("saved", False, "Print what each preset keeps for one decoder layer, then exit.")

GIB = 2**30


def build(config, num_devices: int):
  """(graphdef, abstract train state, abstract batch, TrainStep, model config, mesh, frozen) on simulated CPU
  devices."""
  return compile_tool.build_train(config, jax.devices()[:num_devices])


def layer_residuals(cfg, config, mesh, preset: str):
  """(description lines, bytes) of what one decoder layer's backward keeps under `preset`, at the per-device
  batch (the batch split over the batch axes; tensor-parallel splits are not applied, so bytes are an upper
  bound); (None, 0) for `none`, where no checkpoint boundary exists."""
  from flax import nnx
  from qwen3vl import sharding
  from qwen3vl.model import remat, rope
  from qwen3vl.model.text import DecoderLayer

  policy = remat.policy(preset, cfg.remat_custom)
  if policy is None:
    return None, 0
  layer_graph, layer_state = nnx.split(nnx.eval_shape(lambda: DecoderLayer(cfg, nnx.Rngs(0))))
  t, d = cfg.text, config.data
  shards = math.prod(mesh.shape[a] for a in sharding.BATCH)
  b = d.batch_size // shards if d.batch_size % shards == 0 else d.batch_size
  x = jax.ShapeDtypeStruct((b, d.max_length, t.hidden_size), cfg.dtype)
  positions = jax.ShapeDtypeStruct((3, b, d.max_length), np.int32)
  segment_ids = jax.ShapeDtypeStruct((b, d.max_length), np.int32)

  def fn(state, x, positions, segment_ids):
    cos, sin = rope.mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section, x.dtype)
    layer = nnx.merge(layer_graph, state)
    return layer(x, cos, sin, segment_ids)[0]

  lines, total = [], 0
  for shape, dtype, source in _saved_residuals(jax.checkpoint(fn, policy=policy), layer_state, x, positions,
                                               segment_ids):
    if "from the argument" in source or "from a constant" in source:
      continue  # the layer's inputs and weights (counted elsewhere), small constants
    size = math.prod(shape) * dtype.itemsize
    total += size
    lines.append(f"  {dtype.name}{list(shape)!s:<26} {size / 2**20:10.2f} MiB  {source.split(' from ')[0]}")
  return lines, total


def _saved_residuals(fn, *args):
  """[(shape, dtype, source)] parsed from `jax.ad_checkpoint.print_saved_residuals` (the public form of it)."""
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  out = []
  for line in text.getvalue().splitlines():
    m = re.match(r"(\w+)\[([\d,]*)\] (.*)", line)
    if m:
      dtype = jax.numpy.dtype({"f32": "float32", "bf16": "bfloat16", "f16": "float16", "i32": "int32",
                               "bool": "bool", "u32": "uint32", "i8": "int8"}.get(m[1], m[1]))
      out.append((tuple(int(d) for d in m[2].split(",") if d), dtype, m[3]))
  return out


def report(config, num_devices: int, presets, hbm_gib: float) -> list[dict]:
  rows = []
  for preset in presets:
    with config.unlocked():
      config.model.remat = config.model.vision_remat = preset
    graphdef, state, batch, step, cfg, mesh, frozen = build(config, num_devices)
    with compile_tool.grouped_matmul_as_on_accelerators(cfg.moe_impl == "ragged"):
      compiled = step.lower(state, batch, frozen).compile()
    mem = compiled.memory_analysis()
    params, opt, data = (compile_tool.shard_bytes(x) for x in ((state["params"], frozen), state["opt_state"], batch))
    opt_host = opt if config.offload.optimizer_state else 0
    temp = mem.temp_size_in_bytes
    offloaded = 0
    if preset in ("minimal_offload", "custom"):  # what goes to host = what the all-on-device twin would keep
      twin = "minimal" if preset == "minimal_offload" else "custom"
      on_device = cfg.replace(remat_custom=cfg.remat_custom.replace(":offload", ":device"))
      kept = layer_residuals(on_device, config, mesh, twin)[1]
      offloaded = (kept - layer_residuals(cfg, config, mesh, preset)[1]) * cfg.text.num_hidden_layers
      temp = max(temp - offloaded, 0)
    # Outputs that do not reuse a donated input; an offloaded optimizer state comes back to host memory.
    extra_out = max(mem.output_size_in_bytes - mem.alias_size_in_bytes - opt_host, 0)
    peak = params + (opt - opt_host) + data + temp + extra_out
    rows.append({"remat": preset, "params": params, "opt_device": opt - opt_host, "opt_host": opt_host,
                 "batch": data, "temp": temp, "activations_host": offloaded, "peak": peak,
                 "fits": peak <= hbm_gib * GIB, "mesh": dict(mesh.shape)})
  return rows


def format_rows(rows, hbm_gib: float) -> list[str]:
  """A table, in GiB (MiB when every peak is under 1 GiB); `~` marks estimated temporaries."""
  unit, scale = ("GiB", GIB) if max(r["peak"] for r in rows) >= GIB else ("MiB", 2**20)
  out = [f"{'remat (' + unit + ')':<24}{'params':>9}{'opt dev':>9}{'opt host':>9}{'batch':>8}{'temps':>9}"
         f"{'act host':>9}{'peak':>9}  verdict ({hbm_gib:g} GiB)"]
  for r in rows:
    g = {k: r[k] / scale for k in ("params", "opt_device", "opt_host", "batch", "temp", "activations_host", "peak")}
    est = "~" if r["activations_host"] else " "
    out.append(f"{r['remat']:<24}{g['params']:9.2f}{g['opt_device']:9.2f}{g['opt_host']:9.2f}{g['batch']:8.2f}"
               f"{g['temp']:8.2f}{est}{g['activations_host']:9.2f}{g['peak']:9.2f}  "
               f"{'fits' if r['fits'] else 'does not fit'}")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)  # before the CPU backend starts
  from qwen3vl import hardware
  config = _CONFIG.value
  with config.unlocked():
    config.hardware = _TARGET.value
  hardware.apply_overlay(config)
  if _SAVED.value:
    for preset in _REMAT.value:
      with config.unlocked():
        config.model.remat = preset
      _, _, _, _, cfg, mesh, _ = build(config, _DEVICES.value)
      lines, total = layer_residuals(cfg, config, mesh, preset)
      print(f"{preset}: " + ("no checkpointing (the backward keeps every intermediate)" if lines is None else
                             f"{total / 2**20:.2f} MiB per decoder layer per device"))
      for line in lines or []:
        print(line)
    return
  rows = report(config, _DEVICES.value, _REMAT.value, _HBM.value)
  print(f"per device, {_DEVICES.value} devices, mesh {rows[0]['mesh']}, target {_TARGET.value}, "
        f"batch {config.data.batch_size} x {config.data.max_length} tokens + {config.data.max_patches} patches")
  for line in format_rows(rows, _HBM.value):
    print(line)
  best = min(rows, key=lambda r: r["peak"])
  print(f"verdict: {'fits' if best['fits'] else 'does not fit'} on {_HBM.value:g} GiB per device "
        f"(lowest peak {best['peak'] / GIB:.2f} GiB with remat={best['remat']})")


if __name__ == "__main__":
  app.run(main)
