"""Kernels behind one entry point each: ``attention`` picks the fastest implementation that supports the call."""
from kernels.dispatch import attention, implementations, register_implementation
from kernels.xla_attention import xla_attention

__all__ = ["attention", "implementations", "register_implementation", "xla_attention"]
