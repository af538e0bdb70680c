"""Triton kernels for the adapter ops (one file per op: kernels, launchers, autograd).

On a CPU-only machine Triton runs only in interpreter mode: set TRITON_INTERPRET=1 before
importing this package. ``rosafx.lower(adapted, backend="triton")`` puts these kernels into
an adapted graph (see kernels/ops.py for the registered Triton ops).
"""
from .lowrank_linear import lowrank_linear
from .sparse_lowrank_linear import sparse_lowrank_linear
from .vera_linear import vera_linear

__all__ = ["lowrank_linear", "sparse_lowrank_linear", "vera_linear"]
