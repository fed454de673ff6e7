"""Orbax checkpoints of a training run: parameters, optimizer state, step, RNG and the data loader's position.

One `CheckpointManager` per work directory (keep-N, asynchronous saves); the train state is a pytree saved
with StandardSave, the loader position is a small JSON item, so a restored run continues with the same batches.
A LoRA run's state holds only the adapters; the JSON item `base` names where its frozen base came from.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    # Handlers named up front: a restore of some items then reads only those, without warning about the rest.
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "base": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, *, base: dict | None = None, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           data=ocp.args.JsonSave(data_state),
                                                           base=ocp.args.JsonSave(base or {})), force=force)

  def restore(self, step: int, abstract_state):
    """Restores into the structure/shardings of `abstract_state`; returns (state, data_state)."""
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def restore_params(self, step: int):
    """Only the parameters of a saved train state, on this process's first device whatever mesh saved them (a
    run trained on 8 or 64 devices serves from one; no optimizer state needed to rebuild the target). Restores the
    whole item then drops the rest: fine for the model sizes one runs from a workdir."""
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          self.manager.item_metadata(step)["state"])
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return out["state"]["params"]

  def restore_base(self, step: int) -> dict:
    """The `base` item ({"init_from": path} for a LoRA run; {} otherwise or in checkpoints older than it)."""
    if "base" not in (self.manager.item_metadata(step) or {}):
      return {}
    return self.manager.restore(step, args=ocp.args.Composite(base=ocp.args.JsonRestore()))["base"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
