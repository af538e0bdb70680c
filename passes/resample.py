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

from rosafx.distributed import broadcast_adapters
from rosafx.errors import RosafxError
from rosafx.methods.rosa import RosaAdapter, split_weights

from .insert import adapters_of


def resample(adapted: fx.GraphModule, optimizer: torch.optim.Optimizer | None = None) -> fx.GraphModule:
    adapters = [a for a in adapters_of(adapted).values() if isinstance(a, RosaAdapter)]
    if not adapters:
        raise RosafxError("rosafx.resample needs rosa sites; this model has none.")
    resample_adapters(adapters, optimizer)
    return adapted


def resample_adapters(adapters: list[RosaAdapter], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Resample these rosa sites (all of a model's, or one group of its life cycle)."""
    with torch.no_grad():
        folded = [a.base_weight.double() + a.lora_B.double() @ a.lora_A.double() for a in adapters]
        for adapter in adapters:
            adapter.resamples += 1
        split_weights(adapters, folded)
    broadcast_adapters(adapters)  # under DDP: rank 0's factorisation on every rank, bit for bit
    if optimizer is not None:
        for adapter in adapters:
            for param in (adapter.lora_A, adapter.lora_B):
                optimizer.state.pop(param, None)
