"""glibc malloc settings for XLA:CPU, applied by re-running the script with them (train.py, infer.py, benchmarks).

XLA:CPU takes each execution's temporaries as one block (about 2 GB for the train step of
benchmarks/train_vs_hf.py); glibc serves a block that large from a worker thread's arena with a fresh mmap, so
every step faults all its pages in again (485k faults and 1 s of kernel time per 4.2 s step on the 2-core VM,
more when other work ran in between). One arena, no mmap and no trimming keep the freed block in the heap for the
next step: 3.6 s a step, no faults. glibc reads these settings only when a process starts (set at run time with
mallopt they did not hold), so `reexec_with_tuned_malloc` restarts the process once with them in its environment.
Set MALLOC_ARENA_MAX yourself to opt out.
"""
from __future__ import annotations

import os
import platform
import sys

SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}


def reexec_with_tuned_malloc() -> None:
  """Re-executes this process (same interpreter and command line) with `SETTINGS`, unless glibc is not the C
  library or MALLOC_ARENA_MAX is already set (by the re-executed process itself, or by the user)."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_ARENA_MAX" in os.environ:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, {**os.environ, **SETTINGS})
