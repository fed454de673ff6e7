"""Attention speed, side by side: every implementation the dispatcher knows, on the platform at hand.

For each head_dim x length x causal, times the forward and forward+backward of each implementation (through
``kernels.attention(..., implementation=name)``) and reports TFLOP/s with ratios to cuDNN (GPU) or XLA (other
platforms); then block-sparse attention at several densities; on CPU also a memory check of the XLA reference on a
16k-token vision-like sequence. See benchmarks/README.md for how to run it and RESULTS.md for numbers.

Method: random inputs (never zeros), one warm-up call per function (compilation stays out of the numbers), then
``--reps`` rounds in which every (implementation, mode) runs once in turn, each call ended by
``block_until_ready``: interleaving makes clock or thermal drift hit all implementations alike. The median of the
rounds is reported. FLOPs: forward 4 * B * Hq * Lq * Lk * D (the two matmuls), halved for causal; backward 2.5x the
forward, so forward+backward counts 3.5x. Batch is --tokens // length (at least 1), so every length moves the same
number of tokens.

Examples:
  python benchmarks/attention.py --cpu-smoke                    # seconds, CPU: small shapes + 16k memory check
  python benchmarks/attention.py --lengths 1024,4096,16384 --json results.json    # GPU / TPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qwen3vl import kernels  # noqa: E402
from qwen3vl.kernels import dispatch  # noqa: E402

IMPLEMENTATIONS = ("cudnn", "pallas_gpu", "triton", "xla", "pallas_tpu")
# Modules to call directly when a name is not (yet) registered with the dispatcher: (module, function).
DIRECT = {"cudnn": ("qwen3vl.kernels.cudnn_attention", "cudnn_attention"),
          "triton": ("qwen3vl.kernels.triton_attention", "triton_attention"),
          "pallas_gpu": ("qwen3vl.kernels.pallas_gpu_attention", "pallas_gpu_attention"),
          "pallas_tpu": ("qwen3vl.kernels.pallas_tpu_attention", "pallas_tpu_attention")}
BACKWARD_FACTOR = 2.5


def platform_name() -> str:
  b = jax.default_backend()
  return {"cuda": "gpu", "rocm": "gpu"}.get(b, b)


def fwd_flops(b, h, lq, lk, d, causal) -> float:
  return 4.0 * b * h * lq * lk * d * (0.5 if causal else 1.0)


# ----------------------------------------------------------------------------- building the timed functions

def _registry_entry(op, name):
  """(registered?, native platform or None) without depending on the dispatcher's private layout."""
  try:
    names = dispatch.implementations(op) if op != "attention" else dispatch.implementations()
  except (TypeError, ValueError):
    return False, None
  if name not in names:
    return False, None
  registries = getattr(dispatch, "_REGISTRIES", None)
  entry = registries.get(op, {}).get(name) if registries else None
  return True, getattr(entry, "platform", None)


def attention_fn(name, causal, allow_direct=True):
  """(fn(q, k, v) -> out, note): the implementation ``name`` with this mask, or (None, reason) when unavailable."""
  registered, native = _registry_entry("attention", name)
  here = platform_name()
  if registered:
    if native is not None and native != here:
      return None, f"native to {native} (forcing it here would run the interpreter)"
    return (lambda q, k, v: kernels.attention(q, k, v, causal=causal, implementation=name)), ""
  if not allow_direct or name not in DIRECT:
    return None, "not registered"
  mod_name, fn_name = DIRECT[name]
  try:
    mod = __import__(mod_name, fromlist=[fn_name])
    fn = getattr(mod, fn_name)
  except (ImportError, AttributeError) as e:
    return None, f"not registered, {mod_name}.{fn_name} unavailable ({e})"
  return (lambda q, k, v: fn(q, k, v, causal=causal)), "direct call (not registered)"


def timed_pair(fn, ct):
  """Jitted forward and forward+backward (grads of sum(out * ct) w.r.t. q, k, v)."""
  fwd = jax.jit(fn)

  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)

  return fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def warm(f, args):
  """Compiles and runs once; returns None or the reason it failed (NotImplementedError is a polite decline)."""
  try:
    jax.block_until_ready(f(*args))
    return None
  except NotImplementedError as e:
    return f"declined: {e}"
  except Exception as e:  # a real failure: keep benchmarking the others, report it
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def interleaved_median(fns, reps):
  """{key: median seconds}: every fn runs once per round, rounds repeated ``reps`` times."""
  times = {k: [] for k in fns}
  for _ in range(reps):
    for key, (f, args) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[key].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def inputs(b, lq, lk, hq, hkv, d, dtype, seed=0):
  key = jax.random.PRNGKey(seed)
  kq, kk, kv, kc = jax.random.split(key, 4)
  q = jax.random.normal(kq, (b, lq, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, lk, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, lk, hkv, d), jnp.float32).astype(dtype)
  ct = jax.random.normal(kc, (b, lq, hq, d), jnp.float32)
  return q, k, v, ct


# ----------------------------------------------------------------------------- dense attention

def bench_dense(args, record):
  dtype = jnp.dtype(args.dtype)
  for d in args.head_dims:
    for length in args.lengths:
      for causal in args.causal:
        if args.deadline and time.time() > args.deadline:
          print(f"# time budget spent: stopping before d={d} L={length} causal={causal}", flush=True)
          return
        b = max(1, args.tokens // length)
        hkv = args.kv_heads or args.heads
        q, k, v, ct = inputs(b, length, length, args.heads, hkv, d, dtype)
        flops = fwd_flops(b, args.heads, length, length, d, causal)
        fns, notes, info = {}, {}, {}
        for name in args.impls:
          fn, note = attention_fn(name, causal, allow_direct=not args.registered_only)
          if fn is None:
            notes[name] = note
            continue
          fwd, fwdbwd = timed_pair(fn, ct)
          for mode, f in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
            if mode not in args.modes:
              continue
            err = warm(f, (q, k, v))
            if err:
              notes[f"{name}/{mode}"] = err
            else:
              fns[(name, mode)] = (f, (q, k, v))
          if note:
            info[name] = note
        medians = interleaved_median(fns, args.reps) if fns else {}
        for (name, mode), sec in medians.items():
          total = flops * (1 + BACKWARD_FACTOR if mode == "fwd+bwd" else 1)
          record(dict(kind="attention", impl=name, mode=mode, head_dim=d, length=length, batch=b, heads=args.heads,
                      kv_heads=hkv, causal=causal, dtype=str(dtype), ms=sec * 1e3, tflops=total / sec / 1e12,
                      note=info.get(name, "")))
        for key, note in notes.items():
          record(dict(kind="attention_skip", impl=key, head_dim=d, length=length, causal=causal, note=note))
        print(_row_text(args.rows, d, length, causal), flush=True)
        del q, k, v, ct


# ----------------------------------------------------------------------------- block-sparse

def random_layout(nq, nk, density, rng):
  """[nq, nk] bool with round(density * nk) marked blocks per row, the diagonal always among them."""
  per_row = max(1, int(round(density * nk)))
  layout = np.zeros((nq, nk), bool)
  for i in range(nq):
    diag = min(i, nk - 1)
    others = rng.permutation([j for j in range(nk) if j != diag])[:per_row - 1]
    layout[i, [diag, *others]] = True
  return layout


def bench_block_sparse(args, record):
  try:
    from qwen3vl.kernels.block_sparse import block_sparse_attention
  except ImportError as e:
    record(dict(kind="block_sparse_skip", impl="-", note=f"kernels.block_sparse unavailable: {e}"))
    print(f"# block-sparse: skipped ({e})", flush=True)
    return
  try:
    names = dispatch.implementations("block_sparse_attention")
  except (TypeError, ValueError):
    names = (None,)
  dtype = jnp.dtype(args.dtype)
  length, d, bs = args.sparse_length, args.sparse_head_dim, args.sparse_block
  b = max(1, args.tokens // length)
  hkv = args.kv_heads or args.heads
  q, k, v, ct = inputs(b, length, length, args.heads, hkv, d, dtype, seed=1)
  nq = nk = -(-length // bs)
  rng = np.random.default_rng(0)
  layouts = {dens: random_layout(nq, nk, dens, rng) for dens in args.densities}
  fns = {}
  for name in names:
    registered, native = _registry_entry("block_sparse_attention", name) if name else (True, None)
    if native is not None and native != platform_name():
      record(dict(kind="block_sparse_skip", impl=name, note=f"native to {native}"))
      continue
    for dens, layout in layouts.items():
      fn = (lambda layout, name: lambda q, k, v: block_sparse_attention(
          q, k, v, layout, block_size=bs, implementation=name))(layout, name)
      fwd, fwdbwd = timed_pair(fn, ct)
      for mode, f in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
        if mode not in args.sparse_modes:
          continue
        err = warm(f, (q, k, v))
        if err:
          record(dict(kind="block_sparse_skip", impl=f"{name}/{mode}", density=dens, note=err))
        else:
          fns[(name or "auto", mode, dens)] = (f, (q, k, v))
  medians = interleaved_median(fns, args.reps) if fns else {}
  dense_flops = fwd_flops(b, args.heads, length, length, d, False)
  for (name, mode, dens), sec in sorted(medians.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
    full = medians.get((name, mode, max(args.densities)), sec)
    marked = float(layouts[dens].mean())
    total = dense_flops * marked * (1 + BACKWARD_FACTOR if mode == "fwd+bwd" else 1)
    record(dict(kind="block_sparse", impl=name, mode=mode, density=dens, marked=marked, head_dim=d, length=length,
                batch=b, heads=args.heads, block_size=bs, dtype=str(dtype), ms=sec * 1e3,
                tflops=total / sec / 1e12, speedup_vs_densest=full / sec))
  del q, k, v, ct


# ----------------------------------------------------------------------------- 16k vision memory check

def vision_memory_check(args, record):
  """XLA reference on [1, 16384, 16, 72] float32 with one segment: compiled peak memory vs a 16k x 16k matrix."""
  length, heads, d = args.vision_length, 16, 72
  s = jax.ShapeDtypeStruct
  fn = jax.jit(lambda q, k, v, seg: kernels.attention(q, k, v, segment_ids=seg, implementation="xla"))
  shapes = (s((1, length, heads, d), jnp.float32),) * 3 + (s((1, length), jnp.int32),)
  t0 = time.perf_counter()
  compiled = fn.lower(*shapes).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None)
  peak = getattr(mem, "peak_memory_in_bytes", None) or (
      temp + mem.argument_size_in_bytes + mem.output_size_in_bytes if temp is not None else None)
  one_head_scores = length * length * 4
  ok = temp is not None and temp < one_head_scores
  row = dict(kind="vision_memory", impl="xla", length=length, heads=heads, head_dim=d, dtype="float32",
             temp_bytes=temp, peak_bytes=peak, one_head_score_matrix_bytes=one_head_scores,
             all_heads_score_matrix_bytes=one_head_scores * heads, compile_s=compile_s, ok=ok)
  if args.vision_run:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, length, heads, d)), jnp.float32) for _ in range(3))
    seg = jnp.ones((1, length), jnp.int32)
    jax.block_until_ready(compiled(q, k, v, seg))
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(q, k, v, seg))
    row.update(run_s=time.perf_counter() - t0, finite=bool(jnp.isfinite(out).all()))
  record(row)
  gib = lambda x: f"{x / 2**30:.3f} GiB" if x is not None else "n/a"
  print(f"# vision check: L={length} H={heads} D={d} f32, XLA reference, one segment: temp {gib(temp)}, peak "
        f"{gib(peak)} vs one head's {length}x{length} f32 scores {gib(one_head_scores)} (all heads "
        f"{gib(one_head_scores * heads)}): {'OK, not materialised' if ok else 'FAILED'}"
        + (f"; ran in {row['run_s']:.1f} s, finite={row['finite']}" if "run_s" in row else ""), flush=True)
  return ok


# ----------------------------------------------------------------------------- tables

def _row_text(rows, d, length, causal):
  cells = []
  for r in rows:
    if r.get("kind") == "attention" and (r["head_dim"], r["length"], r["causal"]) == (d, length, causal):
      cells.append(f"{r['impl']}/{r['mode']} {r['tflops']:.2f} TF/s ({r['ms']:.2f} ms)")
  return f"# d={d} L={length} causal={causal}: " + ("; ".join(cells) or "nothing ran")


def summary_table(rows) -> str:
  """One line per (head_dim, length, causal, mode); a column per implementation: TFLOP/s (ratio to baseline)."""
  dense = [r for r in rows if r.get("kind") == "attention"]
  impls = [n for n in IMPLEMENTATIONS if any(r["impl"] == n for r in dense)]
  impls += sorted({r["impl"] for r in dense} - set(impls))
  base_name = "cudnn" if platform_name() == "gpu" else "xla"
  lines = []
  if dense:
    head = f"{'d':>4} {'L':>6} {'causal':>6} {'mode':>8} | " + " | ".join(f"{n:>16}" for n in impls)
    title = f"TFLOP/s (ratio to {base_name}" + (", or to xla where cudnn did not run)" if base_name != "xla" else ")")
    lines += [title, head, "-" * len(head)]
    keys = sorted({(r["head_dim"], r["length"], r["causal"], r["mode"]) for r in dense},
                  key=lambda t: (t[0], t[1], t[2], t[3] != "fwd"))
    for key in keys:
      got = {r["impl"]: r for r in dense if (r["head_dim"], r["length"], r["causal"], r["mode"]) == key}
      base = got.get(base_name) or got.get("xla")
      cells = []
      for n in impls:
        r = got.get(n)
        cells.append(f"{r['tflops']:8.2f} ({r['tflops'] / base['tflops']:4.2f}x)" if r and base else
                     f"{r['tflops']:8.2f}        " if r else f"{'-':>16}")
      lines.append(f"{key[0]:>4} {key[1]:>6} {str(key[2]):>6} {key[3]:>8} | " + " | ".join(cells))
  sparse = [r for r in rows if r.get("kind") == "block_sparse"]
  if sparse:
    lines += ["", "block-sparse: ms, dense-equivalent marked TFLOP/s, speedup vs the densest layout"]
    for r in sparse:
      lines.append(f"  {r['impl']:>10} {r['mode']:>8} density {r['density']:4.2f} (marked {r['marked']:.2f}) "
                   f"L={r['length']} d={r['head_dim']} bs={r['block_size']}: {r['ms']:8.2f} ms "
                   f"{r['tflops']:7.2f} TF/s  {r['speedup_vs_densest']:5.2f}x")
  skips = [r for r in rows if r.get("kind", "").endswith("_skip")]
  if skips:
    seen = {}
    for r in skips:
      seen.setdefault((r["impl"], r["note"]), r)
    lines += ["", "not measured:"] + [f"  {impl}: {note}" for impl, note in seen]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ints = lambda s: [int(x) for x in s.split(",") if x]
  floats = lambda s: [float(x) for x in s.split(",") if x]
  p.add_argument("--lengths", type=ints, default=[1024, 2048, 4096, 8192, 16384])
  p.add_argument("--head-dims", type=ints, default=[64, 128])
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=0, help="0: same as --heads (MHA)")
  p.add_argument("--tokens", type=int, default=16384, help="batch = max(1, tokens // length)")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLEMENTATIONS))
  p.add_argument("--causal", type=lambda s: [{"true": True, "false": False}[x] for x in s.split(",")],
                 default=[False, True], help="comma list of true/false")
  p.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--densities", type=floats, default=[1.0, 0.5, 0.25, 0.1])
  p.add_argument("--sparse-length", type=int, default=8192)
  p.add_argument("--sparse-head-dim", type=int, default=128)
  p.add_argument("--sparse-block", type=int, default=128)
  p.add_argument("--sparse-modes", type=lambda s: s.split(","), default=None, help="default: --modes")
  p.add_argument("--no-sparse", action="store_true")
  p.add_argument("--registered-only", action="store_true", help="skip names the dispatcher does not know")
  p.add_argument("--vision-check", action="store_true", help="compile-time memory check at 16k tokens (XLA)")
  p.add_argument("--vision-run", action="store_true", help="also run the 16k vision check (slow on CPU)")
  p.add_argument("--vision-length", type=int, default=16384)
  p.add_argument("--time-budget", type=float, default=0, help="seconds; stop starting new configs after it")
  p.add_argument("--json", default="", help="write all results here")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="small float32 shapes, 3 reps, plus the 16k vision memory check: seconds on a CPU")
  args = p.parse_args(argv)
  if args.cpu_smoke:
    args.lengths, args.head_dims, args.heads, args.tokens, args.reps = [256], [64], 4, 256, 3
    args.sparse_modes = args.sparse_modes or ["fwd"]
    args.dtype, args.sparse_length, args.sparse_head_dim, args.sparse_block = "float32", 256, 64, 32
    args.vision_check = True
  args.sparse_modes = args.sparse_modes or args.modes
  args.deadline = time.time() + args.time_budget if args.time_budget else 0
  return args


def main(argv=None):
  args = parse_args(argv)
  rows = []
  args.rows = rows
  meta = dict(device=str(jax.devices()[0].device_kind), platform=platform_name(), jax=jax.__version__,
              python=platform.python_version(), argv=sys.argv[1:], registered=list(dispatch.implementations()),
              time=time.strftime("%Y-%m-%d %H:%M:%S"))
  print(f"# {meta['device']} ({meta['platform']}), jax {meta['jax']}, registered: {meta['registered']}", flush=True)

  def record(row):
    rows.append(row)
    if args.json:
      with open(args.json, "w") as f:  # rewritten after every row: a killed run still leaves its results
        json.dump(dict(meta=meta, results=rows), f, indent=1, default=str)

  ok = True
  stages = [("dense", bench_dense)] + ([] if args.no_sparse else [("block-sparse", bench_block_sparse)])
  if args.vision_check:
    stages.append(("vision", vision_memory_check))
  for stage, fn in stages:
    t0 = time.perf_counter()
    try:
      result = fn(args, record)
      ok &= result is not False
      print(f"# stage {stage}: {time.perf_counter() - t0:.1f} s", flush=True)
    except Exception:
      ok = False
      print(f"# stage {stage} failed:\n{traceback.format_exc()}", flush=True)
      record(dict(kind=f"{stage}_skip", impl="-", note=traceback.format_exc().splitlines()[-1]))
  print("\n" + summary_table(rows), flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
