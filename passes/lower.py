"""Lower: choose the implementation of every adapter node, torch reference or Triton.

    lowrank_linear = rosafx.lowrank_linear.default(x, W, b, lora_A, lora_B, 2.0, None)
 -> lowrank_linear = rosafx.lowrank_linear_triton.default(x, W, b, lora_A, lora_B, 2.0, None)

Only the node's target changes: arguments and the node's site mark stay, so merge,
resample, save and a second ``lower`` (back to torch) work on a lowered graph. The module
is changed in place and returned, so optimizers holding its adapter parameters keep
training the same tensors. ``auto`` picks Triton when a site's adapter tensors are on CUDA
and torch otherwise; ``triton`` forces it (on CPU only under TRITON_INTERPRET=1). A node
whose op has no Triton implementation keeps its torch one. Both implementations of an op
share one spec (rosafx/ops/spec.py: schema, fake, autograd wiring), so only the kernels
that run change.
"""
from __future__ import annotations

import importlib
import os

import torch
from torch import fx

from rosafx.graph.adapted_graph import adapter_nodes, adapters_of, site_of
from rosafx.errors import RosafxError
from rosafx.ops.spec import SPECS, implementations

BACKENDS = ("auto", "triton", "torch")


def _twins() -> dict:
    """reference op -> Triton op (imports Triton only when a Triton backend is wanted)."""
    try:
        import rosafx.kernels  # noqa: F401  (plugs the Triton implementations into the op specs)
        for spec in list(SPECS.values()):  # ops whose kernels live beside their method
            if spec.kernels:
                importlib.import_module(spec.kernels)
    except ImportError as error:  # triton missing
        raise RosafxError(f"backend='triton' needs the triton package ({error}); "
                          "install triton or lower with backend='torch'.") from error
    return implementations("triton")


def _on_cuda(gm: fx.GraphModule, path: str) -> bool:
    adapter = adapters_of(gm).get(path)
    tensors = list(adapter.parameters()) + list(adapter.buffers()) if adapter is not None else []
    return bool(tensors) and all(t.is_cuda for t in tensors)


def lower(gm: fx.GraphModule, backend: str = "auto") -> fx.GraphModule:
    if backend not in BACKENDS:
        raise RosafxError(f"Unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.")
    nodes = adapter_nodes(gm)
    wants_triton = {n: backend == "triton" or (backend == "auto" and _on_cuda(gm, site_of(n)))
                    for n in nodes}
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RosafxError("backend='triton' needs a CUDA device, or TRITON_INTERPRET=1 set before rosafx "
                          "is imported (slow; for tests). Use backend='torch' or 'auto' on CPU.")
    to_triton = _twins() if any(wants_triton.values()) else {}
    # a graph lowered before has its Triton ops registered already: no Triton import to undo it
    to_torch = {triton: ref for ref, triton in (to_triton or implementations("triton")).items()}
    for node in nodes:
        reference = to_torch.get(node.target, node.target)
        node.target = to_triton.get(reference, reference) if wants_triton[node] else reference
    gm.graph.lint()
    gm.recompile()
    return gm

