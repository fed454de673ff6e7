"""Multi-host training: one process per host (or per accelerator), joined by JAX's own distributed runtime.

* `initialize(config)` calls `jax.distributed.initialize` when the job has several processes: from
  `config.distributed.coordinator` / `num_processes` / `process_id`, or from what JAX detects in the environment
  (SLURM, Open MPI, TPU pods, GKE), with time-outs so a lost host fails the run instead of hanging it.
* Data: every process loads and packs its own share of each global batch (`Loader(shard=...)`: records whose
  position is its index modulo the process count, `batch_size / processes` rows, `max_patches / processes`
  patches), and `global_batch` assembles the shares into global arrays with `jax.make_array_from_process_local_data`.
  Each share's vision rows and vision segment ids are offset by its block, so the tower and the token scatter see
  one consistent global batch.
* Checkpoints: Orbax saves the sharded state from every process (on a filesystem all hosts share); the loaders'
  positions are gathered (`gather_json`) and saved as one item, and each process takes its own back.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from qwen3vl import sharding

# Environment variables that say this process is one of several (what jax.distributed's cluster detection reads).
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


def _multi_process_env() -> bool:
  for name in _CLUSTER_ENV:
    value = os.environ.get(name, "")
    if name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
      if value.isdigit() and int(value) > 1:
        return True
    elif name == "TPU_WORKER_HOSTNAMES":
      if "," in value:
        return True
    elif value:
      return True
  return False


def initialize(dist) -> bool:
  """Joins the job's processes (`dist` = config.distributed); True if this is a multi-process run. A process
  that cannot reach the coordinator within `initialization_timeout_s`, or loses a peer for
  `heartbeat_timeout_s`, raises instead of waiting forever."""
  if dist.enabled == "no" or (dist.enabled == "auto" and not dist.coordinator and not _multi_process_env()):
    return False
  if dist.enabled not in ("auto", "yes", "no"):
    raise ValueError(f"invalid config field distributed.enabled: {dist.enabled!r} (auto, yes or no)")
  jax.distributed.initialize(coordinator_address=dist.coordinator or None, num_processes=dist.num_processes,
                             process_id=dist.process_id, initialization_timeout=int(dist.initialization_timeout_s),
                             heartbeat_timeout_seconds=int(dist.heartbeat_timeout_s))
  print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices, "
        f"{jax.device_count()} in all", flush=True)
  return True


def is_primary() -> bool:
  """The process that writes metrics, configs and the console (Orbax coordinates checkpoints itself)."""
  return jax.process_index() == 0


def local_share(total: int, what: str) -> int:
  """This process's share of a global batch dimension (`what` names the config field in the error)."""
  n = jax.process_count()
  if total % n:
    raise ValueError(f"invalid config field {what}: {total} does not split over {n} processes")
  return total // n


def offset_block(batch: dict, block: int, merged_rows: int) -> dict:
  """A process's share of a global batch made consistent with the blocks before it: visual rows point into
  its own block of the tower's merged output (`merged_rows` rows a block) and its vision segment ids do not
  collide with other blocks'. Block 0 is unchanged."""
  out = dict(batch)
  rows = batch["visual_rows"]
  out["visual_rows"] = np.where(rows >= 0, rows + block * merged_rows, rows).astype(rows.dtype)
  seg = batch["vision_segment_ids"]
  patches = seg.shape[0]  # each block has at most `patches` segments: ids from block * patches + 1 on
  out["vision_segment_ids"] = np.where(seg > 0, seg + block * patches, seg).astype(seg.dtype)
  return out


def global_batch(local: dict, mesh, merge_size: int) -> dict:
  """This process's packed share -> global arrays on the mesh (one process: `sharding.shard_batch`)."""
  n = jax.process_count()
  if n == 1:
    return sharding.shard_batch(local, mesh)
  merged_rows = local["pixel_values"].shape[0] // merge_size**2
  local = offset_block(local, jax.process_index(), merged_rows)
  shapes = {}
  for key, x in local.items():
    shape = list(np.shape(x))
    shape[1 if key == "positions" else 0] *= n
    shapes[key] = tuple(shape)
  shardings = sharding.batch_shardings(shapes, mesh)
  for key, s in shardings.items():
    if s.is_fully_replicated and shapes[key][1 if key == "positions" else 0] > 1:
      raise ValueError(f"batch array {key!r} {shapes[key]} does not split over the mesh's batch axes "
                       f"{dict(mesh.shape)}: make data.batch_size and data.max_patches multiples of them")
  return {k: jax.make_array_from_process_local_data(shardings[k], x, shapes[k]) for k, x in local.items()}


def gather_json(value, size: int = 1 << 16) -> list:
  """Every process's JSON-able `value`, in process order (identical on all processes)."""
  if jax.process_count() == 1:
    return [value]
  data = json.dumps(value).encode()
  if len(data) > size:
    raise ValueError(f"gather_json: {len(data)} bytes is more than {size}")
  buf = np.zeros(size + 4, np.uint8)
  buf[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
  buf[4:4 + len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(bytes(r[4:4 + int(np.frombuffer(r[:4].tobytes(), np.uint32)[0])])) for r in rows]


def any_process(flag: bool) -> bool:
  """True if `flag` holds on some process (all processes call it: a collective)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag]))).any())
