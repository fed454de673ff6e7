"""Compile targets: the chips a program is built for without having them (TPU pods, GPU nodes, simulated CPUs).

    v5e:2x4, v5p:2x2x1, v6e:2x4, ...   libtpu topology names: compile-only TPU devices (needs `jax[tpu]`)
    h100:8, h200:8, b200:8, a100:8      <gpu>:<devices> or <gpu>:<hosts>x<devices>, e.g. h100:4x8 (needs the CUDA
    h100:4x8, l4:1                      plugin: `jax-cuda12-plugin`, `jax-cuda12-pjrt`; no NVIDIA libraries)
    cpu:8                               N simulated CPU devices of this process

GPUs are described to XLA:GPU by a target config (a `GpuTargetConfigProto` text) written here from the vendors'
figures in `gpu_specs.json`; TPUs by libtpu's own topology. Both real compilers run on a CPU host with
`JAX_PLATFORMS=cpu` (the default backend stays CPU). `memory_bytes` is the HBM a chip offers, for the verdict.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re

import jax

# HBM per chip by device kind (Google's published figures).
TPU_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5p": 95, "TPU v5": 95, "TPU v6 lite": 32, "TPU7x": 192}
GPU_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs.json")


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as given: "v5e:2x4", "h100:8", "cpu:8"
  platform: str  # "tpu", "gpu", "cpu"
  devices: tuple  # jax devices (compile-only for TPU and GPU)
  device_kind: str
  memory_bytes: int | None  # HBM per device (None: unknown, e.g. CPU)


def gpu_specs() -> dict:
  with open(GPU_SPECS) as f:
    return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def gpu_target_config(spec: dict) -> str:
  """The `GpuTargetConfigProto` text XLA:GPU compiles for, from one entry of gpu_specs.json."""
  major, minor = spec["compute_capability"]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {spec['shared_memory_per_sm']}
  shared_memory_per_block_optin: {spec['shared_memory_per_block_optin']}
  threads_per_core_limit: 2048
  core_count: {spec['sm_count']}
  fpus_per_core: {spec['fp32_units_per_sm']}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(spec['memory_bandwidth'])}
  l2_cache_size: {spec['l2_cache_bytes']}
  clock_rate_ghz: {spec['clock_ghz']}
  device_memory_size: {spec['memory_bytes']}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{spec['name']}"
"""


def _tpu(name: str) -> Target:
  from jax.experimental import topologies
  kind, _, shape = name.partition(":")
  dims = [int(d) for d in shape.split("x")] if re.fullmatch(r"\d+(x\d+)*", shape) else []
  if dims == [1]:
    name = f"{kind}:1x1"  # one chip
  kwargs = {}
  if dims and len(dims) <= 3 and all(d <= 2 for d in dims):
    # Slices smaller than a host's default chip bounds (a single chip, 2x1) need the host's bounds given.
    kwargs["chips_per_host_bounds"] = tuple((dims + [1, 1, 1])[:3]) if dims != [1] else (1, 1, 1)
  try:
    try:
      topology = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception:
      if not kwargs:
        raise
      topology = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
  except Exception as e:  # no libtpu, or a name libtpu does not know
    have_libtpu = importlib.util.find_spec("libtpu") is not None
    raise ValueError(f"--target={name}: cannot make a TPU topology ({type(e).__name__}: {str(e).splitlines()[0]}); "
                     + ("libtpu does not know this topology" if have_libtpu else
                        "TPU targets need `pip install \"jax[tpu]\"` (libtpu)")) from e
  devices = tuple(topology.devices)
  kind = devices[0].device_kind
  gib = next((v for k, v in sorted(TPU_HBM_GIB.items(), key=lambda kv: -len(kv[0])) if kind.startswith(k)), None)
  return Target(name, "tpu", devices, kind, None if gib is None else gib * 2**30)


def _gpu(name: str, gpu: str, hosts: int, per_host: int) -> Target:
  from jax.experimental import topologies
  spec = gpu_specs()[gpu]
  try:
    topology = topologies.get_topology_desc(gpu, "cuda", target_config=gpu_target_config(spec),
                                            topology=f"1x{hosts}x{per_host}")
  except Exception as e:
    raise ValueError(f"--target={name}: cannot make a GPU topology ({type(e).__name__}: "
                     f"{str(e).splitlines()[0]}); GPU targets need `pip install jax-cuda12-plugin "
                     "jax-cuda12-pjrt` (no NVIDIA libraries are needed to compile)") from e
  return Target(name, "gpu", tuple(topology.devices), spec["name"], int(spec["memory_bytes"]))


def resolve(name: str) -> Target:
  """The Target named `name` (see the module docstring); ValueError naming the bad part otherwise."""
  gpus = gpu_specs()
  m = re.fullmatch(r"([a-z0-9_]+):(?:(\d+)x)?(\d+)", name)
  if m and m[1] == "cpu":
    n = int(m[3])
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise ValueError(f"--target={name}: this process has {len(devices)} CPU devices; set "
                       f"jax.config.update('jax_num_cpu_devices', {n}) before JAX starts")
    return Target(name, "cpu", tuple(devices[:n]), devices[0].device_kind, None)
  if m and m[1] in gpus:
    return _gpu(name, m[1], int(m[2] or 1), int(m[3]))
  if re.fullmatch(r"v\d+[a-z]*(-\d+|:\d+(x\d+)*)", name):
    return _tpu(name)
  raise ValueError(f"--target={name!r} is not a target: give a TPU topology (v5e:2x4, v5p:2x2x1, v6e:2x4), "
                   f"<gpu>:<devices> or <gpu>:<hosts>x<devices> with gpu one of {', '.join(gpus)}, or cpu:N")
