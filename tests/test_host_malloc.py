"""train.py and infer.py restart once with glibc settings that keep XLA:CPU's large per-execution buffers in the
heap: a computation with a 41 MB temporary then faults no pages in, where plain glibc maps and faults the whole
buffer in on every call."""
import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT
from qwen3vl.host_malloc import SETTINGS

REPEATED_CALLS = """
import os, resource, sys
from qwen3vl.host_malloc import reexec_with_tuned_malloc
reexec_with_tuned_malloc()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (x @ x.T) @ x)
x = jnp.ones((3200, 64), jnp.float32)  # a 41 MB temporary per call, above glibc's largest mmap threshold
faults = []
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(os.environ.get("MALLOC_ARENA_MAX"), *faults[4:])  # the heap settles after a few calls
"""


def _run(**env):
  clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
  out = subprocess.run([sys.executable, "-c", REPEATED_CALLS], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**clean, "PYTHONPATH": ROOT, **env})
  assert out.returncode == 0, out.stderr[-2000:]
  arena, *faults = out.stdout.split()
  return arena, [int(f) for f in faults]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_tuned_malloc_reuses_large_buffers():
  arena, faults = _run()
  # Restarted with the settings; calls take the buffer from the heap, though not every time: the order in which
  # XLA's threads free the previous call's buffers sometimes leaves no hole big enough (a third to two thirds of
  # the calls on a loaded 2-core machine), so at least a quarter of 16, where untuned glibc makes none.
  assert arena == "1" and sum(f < 500 for f in faults) >= len(faults) // 4, faults
  arena, untuned = _run(MALLOC_ARENA_MAX="8")  # a user's own setting: no restart, glibc as usual
  assert arena == "8" and min(untuned) > 5000, untuned  # 41 MB = 10000 pages faulted in again on every call
