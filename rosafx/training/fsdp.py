"""Prototype: FSDP2 (``fully_shard``) per layer on the layer-structured graph, adapters
replicated (docs/scale.md §2). Runs on CPU with gloo; not wired into ``fit`` or the CLI.

    structured = shard_layers(adapted)        # inside an initialized process group
    loss_fn(structured, my_rows).backward()
    average_replicated_gradients(structured)  # adapters, head: mean over ranks (as DDP would)
    optimizer.step()                           # an optimizer over adapted's trainable parameters

Each layer becomes its own module owning its base weights (``passes/layer_modules.py``) and
is ``fully_shard``-ed: its weights are split by rows across the ranks, gathered just before
the layer runs (forward and backward) and freed after. The adapters (and everything outside
the layers: embeddings, head) are not sharded: every rank holds them whole and their
gradients are averaged across ranks by ``average_replicated_gradients``. Trainable weights
inside a layer (``{"method": "full"}`` on a layer's site) would be sharded and their
gradients reduce-scattered by FSDP itself.

What this prototype does not do: shard the adapted model in place (``adapted`` keeps its
full base weights; the structured copy shares its Parameters until ``fully_shard``
replaces the layer's own), life cycles (calibration, resample, masks) under FSDP, merge
or export of sharded weights, meta-device capture, checkpoints.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import fx

from rosafx.errors import RosafxError
from rosafx.graph.layers import layer_runs


def shard_layers(adapted: fx.GraphModule, *, reshard_after_forward: bool = True) -> fx.GraphModule:
    """A layer-structured copy of ``adapted`` with every layer ``fully_shard``-ed; the
    adapters are ``adapted``'s own Parameters (train them there)."""
    from torch.distributed.fsdp import fully_shard

    from rosafx.passes.bank import unbank_adapters
    from rosafx.passes.layer_modules import layer_modules
    if not (dist.is_available() and dist.is_initialized()):
        raise RosafxError("shard_layers needs an initialized process group (torchrun, then "
                          "rosafx.training.distributed.init_from_torchrun()).")
    unbank_adapters(adapted)  # the structured copy runs without adapted's forward hooks: one Parameter a tensor
    structured = layer_modules(adapted)
    for path in dict.fromkeys(run.path for run in layer_runs(adapted)):
        fully_shard(structured.get_submodule(path), reshard_after_forward=reshard_after_forward)
    return structured


def average_replicated_gradients(model: torch.nn.Module) -> None:
    """All-reduce (mean) the gradients of the parameters FSDP does not shard."""
    from torch.distributed.tensor import DTensor
    size = dist.get_world_size()
    for p in model.parameters():
        if p.requires_grad and p.grad is not None and not isinstance(p, DTensor):
            dist.all_reduce(p.grad)
            p.grad.div_(size)


__all__ = ["shard_layers", "average_replicated_gradients"]
