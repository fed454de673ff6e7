"""Kernels under a mesh (kernels/partition.py): on 8 simulated CPU devices (data 2 x fsdp 2 x tensor 2) the Pallas
GPU kernel (interpret mode) runs inside a shard_map and gives the values and gradients of the XLA reference without
a mesh: batch and heads split, a batch or head count the axes do not divide (replicated over them), the packed
vision sequence split by rows with segments, and block layouts. Runs in a subprocess (8 CPU devices).

The partitioning is the same code for every kernel; the Pallas TPU kernel's share is checked from compiled v5e
programs (test_compile.py) instead: its interpreter (pltpu.InterpretParams) hung under a shard_map on several CPU
devices here (no CPU time, 5 minutes, even on 2 devices), as a barrier across the simulated devices would."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import jax
jax.config.update("jax_num_cpu_devices", 8)
import jax.numpy as jnp, numpy as np
from qwen3vl import kernels
from qwen3vl.kernels import partition
from qwen3vl.kernels.xla_attention import xla_attention
from qwen3vl.kernels.xla_block_sparse import xla_block_sparse_attention

mesh = jax.make_mesh((2, 2, 1, 2), ("data", "fsdp", "expert", "tensor"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 4)
rng = np.random.default_rng(0)

def case(b, lq, hq, hkv, d=16):
  q = jnp.asarray(rng.normal(size=(b, lq, hq, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, lq, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, lq, hkv, d)), jnp.float32)
  return q, k, v

def check(name, ours, ref, args, plan=None):
  loss = lambda f: (lambda *a: (f(*a) ** 2).sum())
  with jax.set_mesh(mesh):
    out = jax.jit(ours)(*args)
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(*args)
  want, want_grads = ref(*args), jax.grad(loss(ref), argnums=(0, 1, 2))(*args)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5, err_msg=name)
  for g, w, n in zip(grads, want_grads, "qkv"):
    np.testing.assert_allclose(g, w, atol=2e-4, rtol=2e-4, err_msg=f"{name} d{n}")
  if plan is not None:
    q, k = args[0], args[1]
    got = partition.plan(mesh.abstract_mesh, q.shape, k.shape,
                         **plan[0])
    assert got == plan[1], (name, got, plan[1])
  print("ok", name)

for impl in ("pallas_gpu",):
  # batch over data x fsdp, heads over tensor
  q, k, v = case(4, 40, 4, 2)
  seg = jnp.asarray(np.repeat([[1] * 25 + [2] * 15], 4, 0), jnp.int32)
  check(f"{impl} split", lambda q, k, v: kernels.attention(q, k, v, causal=True, segment_ids=seg, implementation=impl),
        lambda q, k, v: xla_attention(q, k, v, causal=True, segment_ids=(seg, seg)), (q, k, v),
        ({}, (("data", "fsdp"), ("tensor",))))
  # batch 3 and one kv head: nothing divides, the kernel runs replicated (gradients must not be summed twice)
  q, k, v = case(3, 24, 3, 1)
  check(f"{impl} replicated", lambda q, k, v: kernels.attention(q, k, v, causal=True, implementation=impl),
        lambda q, k, v: xla_attention(q, k, v, causal=True), (q, k, v), ({}, ((), ())))
  # batch 2: only data divides it
  q, k, v = case(2, 24, 4, 2)
  check(f"{impl} partial", lambda q, k, v: kernels.attention(q, k, v, sliding_window=7, implementation=impl),
        lambda q, k, v: xla_attention(q, k, v, sliding_window=7), (q, k, v), ({}, (("data",), ("tensor",))))
  # the vision tower's packed sequence: rows over the batch axes, images straddling the devices' blocks
  q, k, v = case(1, 128, 4, 4)
  vseg = jnp.asarray([np.repeat(np.arange(1, 6), [30, 50, 10, 28, 10])], jnp.int32)
  check(f"{impl} sequence", lambda q, k, v: kernels.attention(q, k, v, segment_ids=vseg, implementation=impl,
                                                             sequence_sharded=True),
        lambda q, k, v: xla_attention(q, k, v, segment_ids=(vseg, vseg)), (q, k, v),
        ({"sequence_sharded": True}, (("data", "fsdp"), ("tensor",))))
  layout = kernels.segment_layout(vseg, vseg, 16)[0]
  check(f"{impl} sequence layout", lambda q, k, v: kernels.block_sparse_attention(
            q, k, v, layout, block_size=16, segment_ids=vseg, implementation=impl, sequence_sharded=True),
        lambda q, k, v: xla_block_sparse_attention(q, k, v, block_layout=layout, block_size=16,
                                                   segment_ids=(vseg, vseg)), (q, k, v))
  # a per-head static layout, heads over tensor
  q, k, v = case(4, 48, 4, 2)
  hl = np.tril(np.ones((4, 3, 3), bool)); hl[1, 2, 0] = False
  check(f"{impl} head layout", lambda q, k, v: kernels.block_sparse_attention(
            q, k, v, hl, block_size=16, causal=True, implementation=impl),
        lambda q, k, v: xla_block_sparse_attention(q, k, v, block_layout=hl, block_size=16, causal=True), (q, k, v))
print("all ok")
"""


def test_kernels_per_device_match_the_reference():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
  assert run.returncode == 0 and "all ok" in run.stdout, run.stdout[-3000:] + run.stderr[-5000:]
