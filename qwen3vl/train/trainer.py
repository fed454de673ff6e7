"""The training loop behind `python train.py`.

The hot path is two jitted pure functions over a plain pytree state {params, opt_state, step, rng}:
`train_step` (donated state) and `eval_step`. The model object is rebuilt inside them from the static graph
definition with `nnx.merge`, so nothing walks the NNX object graph per step. Checkpoints (Orbax) hold the state
and the loader position; SIGTERM / Ctrl-C save before exiting, and a restarted run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from qwen3vl import distributed, hardware, sharding
from qwen3vl.config import RUNTIME_FIELDS, ModelConfig
from qwen3vl.data.datasets import SampleBuilder, processors_for
from qwen3vl.data.loader import JsonlSource, Loader, SyntheticSource
from qwen3vl.data.packing import Packer, to_model_inputs
from qwen3vl.data.tokenizer import Tokenizer
from qwen3vl.model import lora, moe
from qwen3vl.model.vlm import Qwen3VL
from qwen3vl.train import adapters, init_from, losses
from qwen3vl.train.checkpoint import Checkpointer
from qwen3vl.train.metrics import MetricsWriter
from qwen3vl.train.optim import make_optimizer, schedule



# ---------------------------------------------------------------------------------------------------- set-up
def source(config) -> str | None:
  """The directory the run starts from: `init_from` (a HF or train.py work directory), or its older alias
  `init_from_hf`."""
  if config.init_from and config.init_from_hf and config.init_from != config.init_from_hf:
    raise ValueError(f"config.init_from={config.init_from!r} and config.init_from_hf={config.init_from_hf!r}: "
                     f"give one (init_from takes both kinds of directory)")
  return config.init_from or config.init_from_hf


def lora_fields(config) -> dict:
  """`ModelConfig` fields of `config.lora`: adapters, and how the frozen base is held (`lora.base`: float32,
  bfloat16, or int8 / nf4 codes over bfloat16)."""
  c = config.lora
  if not c.rank:
    return {}
  if c.base not in ("float32", "bfloat16", "int8", "nf4"):
    raise ValueError(f"invalid config field lora.base: {c.base!r} (float32, bfloat16, int8 or nf4)")
  fields = dict(lora_rank=c.rank, lora_alpha=float(c.alpha), lora_dropout=float(c.dropout),
                lora_targets=lora.parse_targets(c.targets), base_quant=c.base if c.base in ("int8", "nf4") else "")
  if c.base != "float32":
    fields["param_dtype"] = "bfloat16"
  return fields


def model_config(config, tokenizer: Tokenizer | None = None) -> ModelConfig:
  """The model's config: the architecture of `init_from` (HF config.json or a work directory's
  model_config.json), or the preset, with the runtime switches and LoRA fields of `config`; token ids must agree
  with the tokenizer when one is given (an error names the field otherwise)."""
  runtime = {k: config.model[k] for k in RUNTIME_FIELDS if k in config.model}
  runtime.update(lora_fields(config))
  if source(config):
    cfg = init_from.architecture(source(config), **runtime)
  else:
    fields = {k: v for k, v in config.model.to_dict().items() if k not in RUNTIME_FIELDS}
    cfg = ModelConfig.from_dict({**fields, **runtime})
  if tokenizer is None:
    return cfg
  ids = tokenizer.special_ids
  for field in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
    if getattr(cfg, field) != ids[field]:
      raise ValueError(f"config.model.{field}={getattr(cfg, field)} but the tokenizer has {ids[field]}")
  if cfg.text.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"config.model.text.vocab_size={cfg.text.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary ({tokenizer.vocab_size})")
  return cfg


def validate(config):
  c = config
  for name, value, ok in (
      ("train.steps", c.train.steps, c.train.steps > 0),
      ("train.eval_every", c.train.eval_every, c.train.eval_every > 0),
      ("data.batch_size", c.data.batch_size, c.data.batch_size > 0),
      ("data.max_length", c.data.max_length, c.data.max_length > 1),
      ("data.max_patches", c.data.max_patches, c.data.max_patches % 4 == 0 and c.data.max_patches >= 0),
      ("optim.lr", c.optim.lr, c.optim.lr > 0),
      ("optim.grad_accum", c.optim.grad_accum, c.optim.grad_accum >= 1)):
    if not ok:
      raise ValueError(f"invalid config field {name}: {value!r}")
  unknown = set(c.optim.lr_mult) - {"vision", "merger", "llm"}
  if unknown:
    raise ValueError(f"invalid config field optim.lr_mult: unknown groups {sorted(unknown)}")
  for path in (c.data.train_path, c.data.eval_path, c.init_from, c.init_from_hf, c.tokenizer):
    if path and not os.path.exists(path):
      raise FileNotFoundError(f"config path {path!r} does not exist")


def make_loaders(config, tokenizer, model_cfg):
  """(train loader, eval loader factory) of this process's share of every batch (all of it on one process)."""
  d, v = config.data, model_cfg.vision
  image_processor, video_processor = processors_for(v, min_pixels=d.min_pixels, max_pixels=d.max_pixels)
  builder = SampleBuilder(tokenizer, max_length=d.max_length, image_processor=image_processor,
                          video_processor=video_processor, token_ratio=model_cfg.vision_token_ratio)
  packer = Packer(distributed.local_share(d.batch_size, "data.batch_size"), d.max_length,
                  distributed.local_share(d.max_patches, "data.max_patches"), pack=d.pack, builder=builder,
                  merge_size=v.spatial_merge_size, num_position_embeddings=v.num_position_embeddings)
  if d.train_path:
    train_src = JsonlSource(d.train_path)
    eval_src = JsonlSource(d.eval_path) if d.eval_path else None
  else:
    train_src = SyntheticSource("train", d.synthetic_train_size, d.image_size, config.seed)
    eval_src = SyntheticSource("eval", d.synthetic_eval_size, d.image_size, config.seed)
  shard = (jax.process_index(), jax.process_count())
  train = Loader(train_src, packer, seed=config.seed, shuffle=True, prefetch=d.prefetch, shard=shard)
  make_eval = (lambda: Loader(eval_src, packer, seed=config.seed, shuffle=False, prefetch=d.prefetch,
                              epochs=1, shard=shard)) if eval_src else None
  return train, make_eval


def initial_params(config, cfg: ModelConfig, start_from: str | None):
  """(graphdef, trainable params, frozen params, mesh), placed on the mesh: the model initialized from
  `config.seed`, or built from `start_from`'s weights (adapters initialized, the base quantized as `cfg` says);
  with adapters only they train and the rest is frozen."""
  mesh = sharding.make_mesh(config.mesh)
  if start_from is None:
    if cfg.base_quant:
      raise ValueError("config.lora.base int8 / nf4 quantizes a pretrained base: set config.init_from")
    model = Qwen3VL(cfg, rngs=nnx.Rngs(config.seed))
    graphdef, state = nnx.split(model)
    host = jax.device_get(nnx.to_pure_dict(state))
    del model
  else:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(config.seed))))
    host = adapters.build(nnx.to_pure_dict(state), init_from.base_params(start_from, cfg), cfg, config.seed)
  params = sharding.place(host, sharding.param_shardings(state, mesh))
  trainable, frozen = adapters.split(params, cfg)
  return graphdef, trainable, frozen, mesh


def initial_state(params, tx, shardings: dict, seed: int) -> dict:
  """The train state at step 0, placed by `shardings` (`state_shardings`)."""
  return {"params": params, "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
          "step": sharding.place(np.zeros((), np.int32), shardings["step"]),
          "rng": sharding.place(jax.random.key_data(jax.random.key(seed)), shardings["rng"])}


# ------------------------------------------------------------------------------------------------ step fns
def model_losses(model, extras: dict, batch, config) -> tuple[jax.Array | float, dict]:
  """The model's own training terms beside the objective (SFT's or post-training's), and their metrics: MoE load
  balancing and router z-loss, the Mixture-of-Depths predictor's loss."""
  loss, metrics = 0.0, {}
  if extras["router_logits"] is not None:
    routed = extras.get("router_mask", (batch["segment_ids"] > 0).reshape(-1))  # tokens each layer processed
    aux, z, load = losses.moe_losses(extras["router_logits"], routed, model.config.text.num_experts_per_tok)
    loss = loss + config.loss.aux_loss_coef * aux + config.loss.z_loss_coef * z
    metrics.update({"loss/aux": aux, "loss/z": z, "moe/expert_load": load,
                    "moe/max_load": load.max() / load.mean(), "moe/dropped": extras["moe_dropped"].mean()})
  if "depth" in extras:  # the predictor's own loss (its input carries no gradient into the model)
    loss = loss + extras["depth"]["predictor_loss"]
    metrics.update({f"mod/{k}": v for k, v in extras["depth"].items()})
  return loss, metrics


def _loss_and_metrics(graphdef, params, batch, config, training: bool = True):
  """Training routes Mixture-of-Depths layers by the row's top-k, evaluation by the causal predictor (what
  decoding sees). `params`: the whole model's (trainable joined with the frozen base)."""
  model = nnx.merge(graphdef, params)
  routing = dict(mod_routing="topk" if training else "predictor")
  inputs = to_model_inputs(batch)
  mask = batch["loss_mask"]
  targets = batch["targets"]
  if config.loss.vocab_chunk:
    hidden, extras = model.forward(inputs, return_hidden=True, **routing)
    head = model.embed.embedding[...].T if model.lm_head is None else model.lm_head.kernel[...]
    ce, correct = losses.chunked_cross_entropy(hidden, head, targets, mask, config.loss.vocab_chunk)
  else:
    logits, extras = model.forward(inputs, **routing)
    ce, correct = losses.cross_entropy(logits, targets, mask)
  own, metrics = model_losses(model, extras, batch, config)
  loss = ce + own
  metrics["loss/ce"] = ce
  em, samples = losses.exact_match(correct, mask, batch["segment_ids"])
  metrics.update({"loss": loss, "correct": (correct * mask).sum(), "tokens": mask.sum(), "exact": em,
                  "samples": samples, "seen_tokens": (batch["segment_ids"] > 0).sum()})
  return loss, metrics


def train_step(state, batch, frozen, *, graphdef, tx, config, opt_on_device=None, loss_fn=None):
  """One update of the trainable parameters `state["params"]`; `frozen` (the rest of the model: a LoRA run's
  base, else empty) gets no gradient. `opt_on_device`: shardings that bring an offloaded optimizer state into
  device memory. `loss_fn(graphdef, params, batch, config) -> (loss, metrics)`: the SFT loss by default (GRPO
  and DPO bring theirs)."""
  loss_fn = loss_fn or _loss_and_metrics
  key = None
  if config.lora.rank and config.lora.dropout:
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  with lora.dropout_key(key):
    grads, metrics = jax.grad(
        lambda p: loss_fn(graphdef, adapters.join(p, frozen), batch, config), has_aux=True)(state["params"])
  opt_state = state["opt_state"]
  if opt_on_device is not None:
    opt_state = jax.device_put(opt_state, opt_on_device)
  updates, opt_state = tx.update(grads, opt_state, state["params"])
  params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state["params"], updates)
  metrics["grad_norm"] = _global_norm(grads)
  new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
  return new, metrics


def state_shardings(params, tx, mesh, config) -> dict:
  """Shardings of the train state {params, opt_state, step, rng}: parameters as placed (`params` may be
  ShapeDtypeStructs), optimizer moments following their parameter, in pinned host memory with
  `config.offload.optimizer_state`; step and RNG replicated."""
  opt = sharding.follow_params(jax.eval_shape(tx.init, params), params, mesh)
  if config.offload.optimizer_state:
    opt = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt)
  return {"params": jax.tree.map(lambda p: p.sharding, params), "opt_state": opt,
          "step": sharding.replicated(mesh), "rng": sharding.replicated(mesh)}


class TrainStep:
  """`train_step` jitted with the state donated and its shardings kept (the compiler would otherwise be free to
  choose). An offloaded optimizer state is moved into device memory for the update and back to pinned host
  memory by the output shardings; it is passed apart and not donated (XLA:CPU cannot alias host buffers)."""

  def __init__(self, graphdef, tx, config, shardings: dict, mesh, loss_fn=None):
    self.offload = bool(config.offload.optimizer_state)
    on_device = (jax.tree.map(lambda s: s.with_memory_kind("device"), shardings["opt_state"])
                 if self.offload else None)
    step = functools.partial(train_step, graphdef=graphdef, tx=tx, config=config, opt_on_device=on_device,
                             loss_fn=loss_fn)
    self._jit = jax.jit(lambda donated, kept, batch, frozen: step({**donated, **kept}, batch, frozen),
                        donate_argnums=0, out_shardings=(shardings, sharding.replicated(mesh)))
    self.mesh = mesh  # traced under it: activation constraints and the MoE shard_map read it

  def _split(self, state):
    kept = ("opt_state",) if self.offload else ()
    return {k: v for k, v in state.items() if k not in kept}, {k: state[k] for k in kept}

  def __call__(self, state, batch, frozen=None):
    with jax.set_mesh(self.mesh):
      return self._jit(*self._split(state), batch, frozen or {})

  def lower(self, state, batch, frozen=None):
    with jax.set_mesh(self.mesh):
      return self._jit.lower(*self._split(state), batch, frozen or {})


def eval_step(params, frozen, batch, *, graphdef, config):
  return _loss_and_metrics(graphdef, adapters.join(params, frozen), batch, config, training=False)[1]


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------------------------------- loop
class StopSignal:
  """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint and exits cleanly at the next step."""

  def __init__(self):
    self.requested = False
    self._old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.requested:  # a second Ctrl-C: give up immediately
      raise KeyboardInterrupt
    self.requested = True

  def restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class Run:
  """A training run's set-up (`setup`), shared by SFT (`train`) and post-training (train/grpo.py)."""
  primary: bool
  tokenizer: Tokenizer
  cfg: ModelConfig
  graphdef: nnx.GraphDef
  frozen: dict
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  shardings: dict
  state: dict  # the train state, restored when the work directory has a checkpoint
  ckpt: Checkpointer
  base_item: dict  # the Orbax item naming a LoRA run's base
  data_state: dict | None  # this process's data position from the checkpoint (None: a fresh run)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Everything before the first step: processes joined, overlay applied, work directory files written, model
  built or loaded, train state placed (and restored from `workdir`'s newest checkpoint, if any)."""
  distributed.initialize(config.distributed)  # before anything starts the backend
  primary = distributed.is_primary()
  platform = hardware.apply_overlay(config)
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  print(f"platform: {platform} ({jax.devices()[0].device_kind}); resolved config:\n{config}", flush=True)

  start_from = source(config)
  tokenizer_file = config.tokenizer or (init_from.tokenizer_file(start_from) if start_from else None)
  tokenizer = Tokenizer.from_file(tokenizer_file) if tokenizer_file else Tokenizer.builtin()
  cfg = model_config(config, tokenizer)
  if primary:
    tokenizer.save(os.path.join(workdir, "tokenizer.json"))  # the work directory is self-contained for infer.py
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2)
  graphdef, params, frozen, mesh = initial_params(config, cfg, start_from)
  tx = make_optimizer(config.optim, config.train.steps, params)
  shardings = state_shardings(params, tx, mesh, config)
  train_state = initial_state(params, tx, shardings, config.seed)
  local, total = sharding.bytes_per_device([train_state["params"], train_state["opt_state"], frozen])
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(train_state["opt_state"])}
  where = " (optimizer state in pinned host memory)" if kinds == {"pinned_host"} else ""
  print(f"mesh: {dict(mesh.shape)}; parameters + optimizer state: {local / 2**20:.2f} MiB per device of "
        f"{total / 2**20:.2f} MiB{where}", flush=True)
  trainable = adapters.count(params)
  if frozen:
    held = cfg.base_quant or cfg.param_dtype
    print(f"model: {cfg.model_type}, LoRA rank {cfg.lora_rank} on {','.join(cfg.lora_targets)}: {trainable:,} "
          f"trainable parameters, {adapters.count(frozen):,} frozen ({held})", flush=True)
  else:
    print(f"model: {cfg.model_type}, {trainable:,} parameters", flush=True)
  if cfg.text.is_moe:
    print(moe.describe(cfg, mesh, platform), flush=True)
  base_item = {"init_from": os.path.abspath(start_from)} if frozen and start_from else {}

  ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
  start, data_state = ckpt.latest_step(), None
  if start is not None:
    # Restored into device memory, then placed (an offloaded optimizer state goes back to pinned host memory).
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding.with_memory_kind("device")),
                            train_state)
    train_state, data_state = ckpt.restore(start, abstract)
    train_state = jax.device_put(train_state, shardings)
    data_state = data_state["processes"][jax.process_index()] if "processes" in data_state else data_state
    print(f"resumed from step {start}", flush=True)
  return Run(primary, tokenizer, cfg, graphdef, frozen, mesh, tx, shardings, train_state, ckpt, base_item,
             data_state)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) a training run in `workdir`; returns the last eval metrics. In a multi-host job every
  process runs this; the first writes the work directory's files and metrics."""
  if config.get("rl") and config.rl.algorithm:  # post-training with rewards or preferences: same entry
    from qwen3vl.train import posttrain
    return posttrain.train(config, workdir)
  run = setup(config, workdir)
  primary, cfg, graphdef, frozen, mesh = run.primary, run.cfg, run.graphdef, run.frozen, run.mesh
  tx, shardings, train_state, ckpt, base_item = run.tx, run.shardings, run.state, run.ckpt, run.base_item
  loader, make_eval = make_loaders(config, run.tokenizer, cfg)
  if run.data_state is not None:
    loader.restore(run.data_state)
  start = int(train_state["step"])

  step_fn = TrainStep(graphdef, tx, config, shardings, mesh)
  jit_eval = jax.jit(functools.partial(eval_step, graphdef=graphdef, config=config))
  eval_fn = lambda params, batch: jit_eval(params, frozen, batch)  # noqa: E731
  lr = schedule(config.optim, config.train.steps)
  peak = hardware.peak_tflops(config)
  writer = MetricsWriter(workdir, config.train.steps, start, enabled=primary)
  merge = cfg.vision.spatial_merge_size

  def data_state():  # one loader position per process, saved as one item
    states = distributed.gather_json(loader.state())
    return states[0] if len(states) == 1 else {"processes": states}

  stop = StopSignal()
  last_eval, flops, window = {}, None, []
  try:
    step = start
    while step < config.train.steps and not stop.requested:
      batch = distributed.global_batch(next(loader), mesh, merge)
      if flops is None:  # first step: compile (cost analysis for MFU), run, and start the clock after it
        flops = _step_flops(step_fn, train_state, batch, frozen)
        train_state, metrics = jax.block_until_ready(step_fn(train_state, batch, frozen))
        window_start = time.perf_counter()
      else:
        train_state, metrics = step_fn(train_state, batch, frozen)
      step += 1
      window.append(metrics)
      writer.advance()
      if step % config.train.log_every == 0 or step == config.train.steps:
        jax.block_until_ready(train_state)
        now = time.perf_counter()
        writer.write(step, _train_record(window, now - window_start, lr(step), flops, peak, loader))
        window, window_start = [], now
      if step % config.train.checkpoint_every == 0:
        ckpt.save(step, train_state, data_state(), base=base_item)
      if make_eval and (step % config.train.eval_every == 0 or step == config.train.steps):
        last_eval = evaluate(eval_fn, train_state["params"], make_eval, config.train.eval_batches, mesh, merge)
        writer.write(step, last_eval)
        writer.print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items()))
    if stop.requested:
      writer.print(f"stop requested: saving a checkpoint at step {step}")
    if ckpt.latest_step() != step:
      ckpt.save(step, train_state, data_state(), base=base_item, force=True)
    ckpt.wait()
  finally:
    stop.restore()
    writer.close()
    loader.close()
    ckpt.close()
  return last_eval


def _step_flops(step_fn, state, batch, frozen) -> float | None:
  try:
    cost = step_fn.lower(state, batch, frozen).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # cost analysis is best-effort: some backends do not report it
    return None


def _train_record(window, seconds, lr, flops, peak, loader) -> dict:
  """Averages of a window of steps; `seconds` is its wall time (the first window excludes compilation)."""
  metrics = jax.device_get(window)
  tokens = sum(float(m["tokens"]) for m in metrics)
  seen = sum(float(m["seen_tokens"]) for m in metrics)
  record = {"train/loss": np.mean([m["loss"] for m in metrics]),
            "train/ce": np.mean([m["loss/ce"] for m in metrics]),
            "train/accuracy": sum(float(m["correct"]) for m in metrics) / max(tokens, 1),
            "train/exact_match": sum(float(m["exact"]) for m in metrics) / max(sum(float(m["samples"])
                                                                              for m in metrics), 1),
            "train/grad_norm": np.mean([m["grad_norm"] for m in metrics]), "train/lr": float(lr),
            "train/tokens_per_s": seen / max(seconds, 1e-9), "train/step_s": seconds / len(window),
            "data/skipped": sum(loader.skipped.values())}
  if "loss/aux" in metrics[0]:
    record["train/aux_loss"] = np.mean([m["loss/aux"] for m in metrics])
    record["train/z_loss"] = np.mean([m["loss/z"] for m in metrics])
    record["train/expert_load"] = np.mean([m["moe/expert_load"] for m in metrics], axis=0).round(4).tolist()
    record["train/moe_dropped"] = np.mean([m["moe/dropped"] for m in metrics])  # token copies, all layers
  if "mod/processed" in metrics[0]:
    record["train/mod_processed"] = np.mean([m["mod/processed"] for m in metrics])
    record["train/mod_predictor_agreement"] = np.mean([m["mod/predictor_agreement"] for m in metrics])
  if flops and peak:
    record["train/mfu"] = flops / (seconds / len(window)) / (peak * 1e12)
  return record


def evaluate(eval_fn, params, make_eval, max_batches: int, mesh, merge_size: int = 2) -> dict:
  """Metrics over up to `max_batches` eval batches. Processes agree on each step (a process whose share ran out
  feeds an all-padding batch while others still have data), so no collective waits for a missing peer."""
  loader = make_eval()
  totals = {"loss": 0.0, "correct": 0.0, "tokens": 0.0, "exact": 0.0, "samples": 0.0, "batches": 0}
  try:
    for _ in range(max_batches):
      batch = next(loader, None)
      if not distributed.any_process(batch is not None):
        break
      if batch is None:
        batch = loader.packer.flush()  # nothing packed: all padding, no loss tokens
      with jax.set_mesh(mesh):
        m = jax.device_get(eval_fn(params, distributed.global_batch(batch, mesh, merge_size)))
      totals["loss"] += float(m["loss/ce"]) * float(m["tokens"])
      for k in ("correct", "tokens", "exact", "samples"):
        totals[k] += float(m[k])
      for k in ("mod/processed", "mod/predictor_agreement"):  # Mixture-of-Depths, routed by the predictor
        if k in m:
          totals[k] = totals.get(k, 0.0) + float(m[k])
      totals["batches"] += 1
  finally:
    loader.close()
  out = {"eval/loss": totals["loss"] / max(totals["tokens"], 1),
         "eval/accuracy": totals["correct"] / max(totals["tokens"], 1),
         "eval/exact_match": totals["exact"] / max(totals["samples"], 1), "eval/samples": totals["samples"]}
  for k in ("mod/processed", "mod/predictor_agreement"):
    if k in totals:
      out["eval/" + k.replace("/", "_")] = totals[k] / max(totals["batches"], 1)
  return out
