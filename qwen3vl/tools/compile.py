"""Build a run's programs for chips you do not have: the real TPU / GPU compilers, on a CPU machine, before renting.

    python -m qwen3vl.tools.compile --config=configs/dense.py:2b --target=v5e:2x4 --config.mesh.data=1 \\
        --config.mesh.fsdp=-1 --config.model.attention_impl=pallas_tpu
    python -m qwen3vl.tools.compile --config=configs/moe.py:30b_a3b --target=h100:8 --step=train,generate
    python -m qwen3vl.tools.compile --config=configs/moe.py --target=cpu:8 --hlo_dir=/tmp/hlo
    python -m qwen3vl.tools.compile --config=configs/moe.py:235b_a22b --target=v5p:4x4x4 --step=moe_layer \\
        --config.mesh.data=1 --config.mesh.expert=64 --config.model.moe_capacity_factor=1.25

Targets (`qwen3vl/tools/targets.py`): libtpu topology names (v5e:2x4, v5p:2x2x1, v6e:2x4, ...), <gpu>:<devices> or
<gpu>:<hosts>x<devices> (h100:8, h200:8, b200:8, a100:8, h100:4x8, l4:1), cpu:N (simulated CPU devices). The
program is the real one: `train` is train.py's `TrainStep` with its state shardings, `generate` is
`qwen3vl.infer.generate`'s prefill + compiled decode loop with its KV cache (`moe_layer`: one MoE layer's forward
and backward alone, to compare the expert dispatches' activations), all traced under the target's mesh
with the target platform's hardware overlay, so the dispatcher picks the kernels the chips would get and runs them
per device. Per step it prints what each device holds (parameters, optimizer state, batch or KV cache), the
compiled temporaries and peak, a verdict against the chip's HBM, which kernel each attention call got with its
per-device operand shapes, and the compile time. Out of memory in the compiler is a verdict, not a traceback.

Exit codes: 0 compiled and fits, 2 does not fit (compiled, or the compiler ran out of memory), 1 anything else.
`--hlo_dir` writes each step's optimized per-device HLO (`train.hlo.txt`, `generate.hlo.txt`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import re
import sys
import time

# The partitioner's C++ warnings (reshards it had to insert) would bury the table; train.py still shows them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GIB = 2**30
# custom_call_target of each kernel family in optimized HLO.
KERNEL_TARGETS = {"tpu_custom_call": "mosaic", "__gpu$xla.gpu.triton": "triton", "triton_kernel_call": "jax-triton",
                  "__cudnn$fmha": "cudnn"}


@dataclasses.dataclass
class Program:
  """One step, ready to lower: `lower()` returns the jax Lowered; the byte counts are per device."""
  name: str
  lower: callable
  held: dict  # {"params": bytes, "optimizer": bytes, "batch": bytes, "cache": bytes} per device
  notes: list = dataclasses.field(default_factory=list)  # lines for the report (the MoE path)
  mesh: dict = dataclasses.field(default_factory=dict)  # axis sizes
  on_host: int = 0  # bytes of `held` in pinned host memory (an offloaded optimizer state), in and out


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (device 0's shard); 4-bit codes (QLoRA's
  nf4 base) packed two to a byte, as XLA:TPU and XLA:GPU hold them."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jax.dtypes.itemsize_bits(x.dtype) // 8
             for x in jax.tree.leaves(tree))


def abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def prepare_config(config, platform: str):
  """`config` with the target platform's hardware overlay applied (fields given on the command line win)."""
  from qwen3vl import hardware
  with config.unlocked():
    config.hardware = platform
  hardware.apply_overlay(config)
  return config


def _abstract_model(config, devices):
  """(model config, mesh, graphdef, abstract state, abstract params with their shardings) on `devices`."""
  from flax import nnx
  from qwen3vl import sharding
  from qwen3vl.model.vlm import Qwen3VL
  from qwen3vl.train import trainer

  cfg = trainer.model_config(config)
  mesh = sharding.make_mesh(config.mesh, list(devices))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))
  params = abstract(nnx.to_pure_dict(state), sharding.param_shardings(state, mesh))
  return cfg, mesh, graphdef, state, params


def _abstract_batch(config, cfg, mesh, drop=()) -> dict:
  """The Packer's batch for `config.data` as ShapeDtypeStructs with their shardings (keys in `drop` left out)."""
  from qwen3vl import sharding
  from qwen3vl.data.packing import batch_shapes
  d = config.data
  shapes = {k: v for k, v in batch_shapes(d.batch_size, d.max_length, d.max_patches, cfg.vision.patch_dim).items()
            if k not in drop}
  placed = sharding.batch_shardings({k: shape for k, (shape, _) in shapes.items()}, mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=placed[k]) for k, (shape, dtype) in shapes.items()}


def build_train(config, devices):
  """(graphdef, abstract train state, abstract batch, TrainStep, model config, mesh, abstract frozen params) for
  `config` on `devices`; with LoRA the state holds the adapters and the frozen base is passed beside it."""
  from qwen3vl.train import adapters, trainer
  from qwen3vl.train.optim import make_optimizer

  cfg, mesh, graphdef, _, params = _abstract_model(config, devices)
  params, frozen = adapters.split(params, cfg)
  tx = make_optimizer(config.optim, config.train.steps, params)
  shardings = trainer.state_shardings(params, tx, mesh, config)
  train_state = abstract({"params": params, "opt_state": jax.eval_shape(tx.init, params),
                          "step": jax.ShapeDtypeStruct((), np.int32), "rng": jax.ShapeDtypeStruct((2,), np.uint32)},
                         shardings)
  batch = _abstract_batch(config, cfg, mesh)
  return graphdef, train_state, batch, trainer.TrainStep(graphdef, tx, config, shardings, mesh), cfg, mesh, frozen


def moe_notes(cfg, mesh, platform: str) -> list[str]:
  """How the MoE layers run on this mesh (model/moe.py), for the report."""
  from qwen3vl.model.moe import describe
  return [describe(cfg, mesh, platform)] if cfg.text.is_moe else []


def train_program(config, devices) -> Program:
  _, state, batch, step, cfg, mesh, frozen = build_train(config, devices)
  platform = devices[0].platform
  held = {"params": shard_bytes(state["params"]) + shard_bytes(frozen), "optimizer": shard_bytes(state["opt_state"]),
          "batch": shard_bytes(batch)}
  notes = moe_notes(cfg, mesh, platform)
  if frozen:
    held_as = cfg.base_quant or cfg.param_dtype
    notes.append(f"lora: rank {cfg.lora_rank} on {','.join(cfg.lora_targets)}: "
                 f"{shard_bytes(state['params']) / 2**20:.1f} MiB of adapters train, "
                 f"{shard_bytes(frozen) / GIB:.2f} GiB of frozen base ({held_as}) per device")
  on_host = held["optimizer"] if config.offload.optimizer_state else 0
  if on_host:
    notes.append("optimizer state in pinned host memory (moved in for the update): not in the peak")
  return Program("train", lambda: step.lower(state, batch, frozen), held, notes, dict(mesh.shape), on_host)


def generate_program(config, devices, max_new_tokens: int) -> Program:
  """`generate`'s first call (prefill of a `data.batch_size` x `data.max_length` prompt with `data.max_patches`
  image patches, then the decode loop) on the abstract model, parameters placed by the sharding rules."""
  from flax import nnx
  from qwen3vl import sharding
  from qwen3vl.data.packing import to_model_inputs
  gen = importlib.import_module("qwen3vl.infer.generate")  # the module (the package exports the function)
  from qwen3vl.infer.sampling import Sampling
  from qwen3vl.model.vlm import Qwen3VL

  cfg, mesh, graphdef, state, params = _abstract_model(config, devices)
  nnx.replace_by_pure_dict(state, params)
  d = config.data
  batch = _abstract_batch(config, cfg, mesh, drop=("targets", "loss_mask"))
  mask = jax.ShapeDtypeStruct((d.batch_size, d.max_length), np.int32, sharding=batch["input_ids"].sharding)
  advance = jax.ShapeDtypeStruct((d.batch_size,), np.int32,
                                 sharding=sharding.batch_shardings({"advance": (d.batch_size,)}, mesh)["advance"])
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  stop_ids = jax.ShapeDtypeStruct((1,), np.int32, sharding=sharding.replicated(mesh))
  size = d.max_length + int(max_new_tokens)
  static = dict(size=size, kv_dtype="auto", max_new_tokens=int(max_new_tokens), sampling=Sampling(0.0, None, None),
                pad_id=0, stream=False)

  def lower():
    with jax.set_mesh(mesh):
      return gen._first.lower(graphdef, state, to_model_inputs(batch), mask, advance, rng, stop_ids, **static)

  cache = jax.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0)).new_cache(d.batch_size, size, "auto"))
  shards = math.prod(mesh.shape[a] for a in sharding.BATCH)
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
  cache_bytes //= shards if d.batch_size % shards == 0 else 1  # the cache's batch follows the batch axes
  held = {"params": shard_bytes(params), "batch": shard_bytes(batch), "cache": cache_bytes}
  return Program("generate", lower, held, moe_notes(cfg, mesh, devices[0].platform), dict(mesh.shape))


def moe_layer_program(config, devices) -> Program:
  """One MoE layer alone, forward and backward, on the config's batch (`data.batch_size` x `data.max_length`
  tokens) over the mesh: its temporaries are the MoE's activations per device, apart from the rest of the model
  (the all_to_all and all_gather dispatches compared on the same mesh and batch)."""
  from flax import nnx
  from qwen3vl import sharding
  from qwen3vl.model.moe import MoE
  from qwen3vl.train import trainer

  cfg = trainer.model_config(config)
  if not cfg.text.is_moe:
    raise ValueError(f"--step=moe_layer: {cfg.model_type} has no MoE layers")
  mesh = sharding.make_mesh(config.mesh, list(devices))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0))))
  params = abstract(nnx.to_pure_dict(state), sharding.param_shardings(state, mesh))
  d = config.data
  x = jax.ShapeDtypeStruct((d.batch_size, d.max_length, cfg.text.hidden_size), cfg.dtype,
                           sharding=sharding.batch_sharding(mesh, 3))

  def loss(params, x):
    y, _, dropped = nnx.merge(graphdef, params)(x)
    return jnp.mean(jnp.square(y.astype(jnp.float32))), dropped

  def lower():
    with jax.set_mesh(mesh):
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(params, x)

  held = {"params": shard_bytes(params), "batch": shard_bytes(x)}
  return Program("moe_layer", lower, held, moe_notes(cfg, mesh, devices[0].platform), dict(mesh.shape))


# ----------------------------------------------------------------------------- HLO reading

_SHAPE = r"(?:\w+\[[\d,]*\](?:\{[^}]*\})?|\((?:[^()]|\([^()]*\))*\))"
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (" + _SHAPE + r") ([\w\-]+)\((.*?)\)(.*)$")


def _strip_layout(shape: str) -> str:
  return re.sub(r"\{[^}]*\}", "", shape)


def parse_instructions(hlo_text: str) -> dict:
  """{name: (shape without layout, opcode, operand names, rest of the line)} of every instruction in HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      name, shape, opcode, operands, rest = m.groups()
      out[name] = (_strip_layout(shape), opcode, re.findall(r"%([\w.\-]+)", operands), rest)
  return out


def kernel_calls(instructions: dict) -> list[dict]:
  """Every custom kernel call of `parse_instructions`' result: {"kind", "name", "operand_names", "operands":
  [shape...], "outputs": shape} (shapes are per device: the optimized HLO is the partitioned module)."""
  calls = []
  for name, (shape, opcode, operand_names, rest) in instructions.items():
    if opcode != "custom-call":
      continue
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    kind = next((v for k, v in KERNEL_TARGETS.items() if target and target[1].startswith(k)), None)
    if kind is not None:
      operands = [instructions[n][0] if n in instructions else "?" for n in operand_names]
      calls.append({"kind": kind, "name": name, "operand_names": operand_names, "operands": operands,
                    "outputs": shape})
  return calls


def tensor_operands(call: dict) -> list[str]:
  """A kernel call's floating-point operand shapes (q, k, v, ... without the scalar-prefetch tables)."""
  return [s for s in call["operands"] if re.match(r"(bf16|f16|f32|f8\w*)\[", s)]


def feeding_ops(instructions: dict, operand: str, depth: int = 6) -> set[str]:
  """Opcodes on the way up from instruction `operand` through layout-only ops (bitcast, copy, reshape,
  transpose, get-tuple-element), to tell whether e.g. an all-gather feeds a kernel."""
  seen, frontier = set(), [operand]
  for _ in range(depth):
    nxt = []
    for n in frontier:
      _, op, args, _ = instructions.get(n, (None, "?", [], ""))
      seen.add(op)
      if op in ("bitcast", "copy", "reshape", "transpose", "get-tuple-element", "copy-start", "copy-done"):
        nxt += args
    frontier = nxt
  return seen


# ----------------------------------------------------------------------------- compile and report

def _oom_bytes(message: str) -> tuple[int | None, bool]:
  """(bytes, of temporaries only?) the compiler said the program needs, from an out-of-memory error (XLA:TPU's
  two wordings: "Used X of Y hbm" for the whole program, "memory required for HLO temporaries (X)")."""
  scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, None: 1, "": 1}
  m = re.search(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", message)
  if m:
    return int(float(m[1]) * scale[m[2]]), False
  m = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
  if m:
    return int(float(m[1]) * scale[m[2]]), True
  return None, False


def compile_program(program: Program, hbm_bytes: int | None, hlo_dir: str | None = None) -> dict:
  """Lowers and compiles `program`; returns its row: held bytes, temps, peak, verdict, kernels, seconds."""
  from qwen3vl import kernels
  row = {"step": program.name, **program.held, "notes": program.notes, "mesh": program.mesh}
  start = time.perf_counter()
  with kernels.dispatch.recording() as choices:
    lowered = program.lower()
  row["choices"] = sorted(set(choices))
  try:
    compiled = lowered.compile()
  except Exception as e:  # an out-of-memory compile is a verdict, anything else an error
    need, temps_only = _oom_bytes(str(e))
    if need is None and not re.search(r"RESOURCE_EXHAUSTED.*(hbm|HBM)", str(e).splitlines()[0]):
      raise  # e.g. a kernel's scalar tables overflowing SMEM is a bug to see, not a verdict
    held = sum(program.held.values())
    row.update(seconds=time.perf_counter() - start, temp=need if temps_only else None, fits=False,
               peak=(held + need if temps_only else need) if need else None, error=str(e).splitlines()[0][:300])
    return row
  row["seconds"] = time.perf_counter() - start
  mem = compiled.memory_analysis()
  row["temp"] = mem.temp_size_in_bytes
  row["host"] = mem.host_temp_size_in_bytes + mem.host_argument_size_in_bytes
  row["peak"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                 + mem.temp_size_in_bytes)
  if program.on_host and not mem.host_argument_size_in_bytes:
    # The compilers (jax 0.10.2, compile-only) count pinned-host arguments and outputs as device ones, and the
    # offloaded state is not donated (an output apart from its input): take both out, count them as host.
    row["peak"] -= 2 * program.on_host
    row["host"] += program.on_host
  row["fits"] = hbm_bytes is None or row["peak"] <= hbm_bytes
  text = compiled.as_text()
  row["kernels"] = kernel_calls(parse_instructions(text))
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"{program.name}.hlo.txt"), "w") as f:
      f.write(text)
  return row


def format_report(target, config, rows) -> list[str]:
  hbm = f"{target.memory_bytes / GIB:.1f} GiB each" if target.memory_bytes else "no HBM limit"
  d = config.data
  peaks = [r["peak"] for r in rows if r.get("peak")]
  unit, scale = ("GiB", GIB) if not peaks or max(peaks) >= GIB else ("MiB", 2**20)
  out = [f"target {target.name}: {len(target.devices)} x {target.device_kind} ({hbm}); mesh {rows[0]['mesh']}; "
         f"batch {d.batch_size} x {d.max_length} tokens + {d.max_patches} patches; model dtype "
         f"{config.model.dtype}, remat {config.model.remat}",
         f"{'step (' + unit + '/device)':<18}{'params':>8}{'optim':>8}{'batch':>8}{'cache':>8}{'temps':>8}{'host':>7}"
         f"{'peak':>8}  {'verdict':<22}{'compile':>9}"]
  for r in rows:
    g = lambda k: f"{r[k] / scale:8.2f}" if r.get(k) is not None else f"{'-':>8}"  # noqa: E731
    verdict = "fits" if r["fits"] else (f"does not fit: {r['peak'] / GIB:.1f} GiB" if r.get("peak") else
                                        "does not fit")
    host = f"{r['host'] / scale:7.2f}" if r.get("host") is not None else f"{'-':>7}"
    out.append(f"{r['step']:<18}{g('params')}{g('optimizer')}{g('batch')}{g('cache')}{g('temp')}{host}{g('peak')}"
               f"  {verdict:<22}{r['seconds']:8.1f}s")
    if r.get("error"):
      out.append(f"  compiler: {r['error']}")
    for op, impl, q, k, dtype in r["choices"]:
      out.append(f"  {r['step']}: {op} -> {impl} for global q{list(q)} k{list(k)} {dtype}")
    out += [f"  {r['step']}: {note}" for note in r["notes"]]
    seen = set()
    for call in r.get("kernels", []):
      tensors = tensor_operands(call)[:3]
      key = (call["kind"], tuple(tensors))
      if key not in seen:
        seen.add(key)
        out.append(f"  {r['step']}: {call['kind']} kernel {call['name']}: per-device {', '.join(tensors)}")
  return out


def run(config, target, steps, max_new_tokens: int = 64, hlo_dir: str | None = None) -> list[dict]:
  """Compiles each of `steps` ("train", "generate") of `config` for `target`; returns the report rows."""
  prepare_config(config, target.platform)
  rows = []
  for step in steps:
    if step == "train":
      program = train_program(config, target.devices)
    elif step == "generate":
      program = generate_program(config, target.devices, max_new_tokens)
    elif step == "moe_layer":
      program = moe_layer_program(config, target.devices)
    else:
      raise ValueError(f"--step: unknown step {step!r}; valid: train, generate, moe_layer")
    with grouped_matmul_as_on_accelerators(target.platform == "cpu" and config.model.moe_impl == "ragged"):
      rows.append(compile_program(program, target.memory_bytes, hlo_dir))
  return rows


def _grouped_matmul_stand_in(x, w, group_sizes):
  """Same shapes in and out as `jax.lax.ragged_dot(x [m, k], w [E, k, n], group_sizes)`, and a gradient of w's
  full [E, k, n] shape, as one matmul with expert 0: XLA:CPU expands ragged_dot to every expert ([E, m, ...]
  temporaries) where XLA:TPU runs a grouped matmul; on cpu:N only the memory arithmetic matters."""
  del group_sizes
  return x @ w[0]


@contextlib.contextmanager
def grouped_matmul_as_on_accelerators(active: bool):
  from qwen3vl.model import moe
  real = moe.grouped_matmul
  if active:
    moe.grouped_matmul = _grouped_matmul_stand_in
  try:
    yield
  finally:
    moe.grouped_matmul = real


def main(argv):
  from absl import app
  from qwen3vl.tools import targets
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    target = targets.resolve(_TARGET.value)
    if _HBM.value:
      target = dataclasses.replace(target, memory_bytes=int(_HBM.value * GIB))
    rows = run(_CONFIG.value, target, _STEP.value, _NEW_TOKENS.value, _HLO_DIR.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for line in format_report(target, _CONFIG.value, rows):
    print(line)
  return 0 if all(r["fits"] for r in rows) else 2


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", "configs/moe.py", "Training config file[:preset].")
  _TARGET = flags.DEFINE_string("target", "cpu:8", "v5e:2x4, v5p:2x2x1, v6e:2x4, h100:8, h100:4x8, b200:8, cpu:N, ...")
  _STEP = flags.DEFINE_list("step", ["train"], "Programs to compile: train, generate, moe_layer (one MoE layer's "
                           "forward + backward alone).")
  _NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Decode steps of the generate program (its KV cache).")
  _HBM = flags.DEFINE_float("hbm_gib", None, "Device memory for the verdict, GiB (default: the target's HBM).")
  _HLO_DIR = flags.DEFINE_string("hlo_dir", None, "Write each step's optimized per-device HLO text here.")
  m = re.match(r"cpu:(\d+)$", next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--target=")), ""))
  if m:
    jax.config.update("jax_num_cpu_devices", int(m[1]))  # before the CPU backend starts
  app.run(main)
