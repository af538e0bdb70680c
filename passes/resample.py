"""Resample (rosa): fold B·A into the frozen weight and factorise again with a fresh block.

    W = base_weight + B·A;  U, Σ, Vᵀ = svd(W);  new block idx;
    B ← (UΣ)[:, idx],  A ← Vᵀ[idx, :],  base_weight ← W − B·A

The output is unchanged (up to fp32 rounding). A and B are written in place, so an
optimizer keeps its references, and their optimizer state is cleared, as the reference
code does by building a new optimizer (learning rate and schedule are kept).
"""
from __future__ import annotations

import torch
from torch import fx

from rosafx.graph.adapted_graph import adapters_of
from rosafx.errors import RosafxError
from rosafx.methods.rosa import RosaAdapter, resample_adapters


def resample(adapted: fx.GraphModule, optimizer: torch.optim.Optimizer | None = None) -> fx.GraphModule:
    adapters = [a for a in adapters_of(adapted).values() if isinstance(a, RosaAdapter)]
    if not adapters:
        raise RosafxError("rosafx.resample needs rosa sites; this model has none.")
    resample_adapters(adapters, optimizer)
    return adapted
