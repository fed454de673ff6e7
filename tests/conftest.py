"""Shared test set-up: float32 parity needs full-precision matmuls on every backend."""
import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

jax.config.update("jax_default_matmul_precision", "highest")
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
