"""Shared test set-up: float32 parity needs full-precision matmuls on every backend."""
import os
import sys

# The default backend is CPU even where the compile-only TPU / GPU stacks (libtpu, the CUDA plugin) are installed;
# the target tests build their devices explicitly. A GPU machine sets JAX_PLATFORMS itself (benchmarks/gpu_check.sh).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

jax.config.update("jax_default_matmul_precision", "highest")
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
