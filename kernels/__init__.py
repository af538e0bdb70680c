"""Triton implementations of the adapter ops (one file per op: kernels, launchers, and the
line that plugs them into the op's spec, ``spec.implement("triton", forward, backward)``).

Importing this package imports every module in it, so each registers ``rosafx::<op>_triton``
(a new kernel file needs no line here); ``rosafx.lower(adapted, backend="triton")`` retargets
adapter nodes to them. On a CPU-only machine Triton runs only in interpreter mode: set
TRITON_INTERPRET=1 before importing this package.
"""
import importlib
import pkgutil

from rosafx.kernels.lowrank_linear import lowrank_linear
from rosafx.kernels.sparse_lowrank_linear import sparse_lowrank_linear
from rosafx.kernels.vera_linear import vera_linear

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["lowrank_linear", "sparse_lowrank_linear", "vera_linear"]
