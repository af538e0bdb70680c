"""Activation memory: the bytes a forward keeps alive for its backward, two ways.

``saved_activation_bytes``: every tensor autograd saves goes through the saved-tensor hooks
in force, including the layer inputs that non-reentrant activation checkpointing keeps (it
saves them outside its own hooks). Not seen: what *selective* checkpointing keeps (its
cache lives inside its own dispatch mode).

``live_activation_bytes``: every storage an operator creates during the forward is
recorded (a dispatch mode, weak references); those still alive once the forward returned
and garbage was collected are what the forward holds for the backward, however it holds
them (autograd, checkpoint inputs, a selective-checkpoint cache). A custom op's kernel runs
below the dispatch mode, so what it creates and saves (the merged weight of
rosafx/ops/lowrank.py) is recorded through the saved-tensor hooks as well.

Both count each distinct storage once at its full size and leave out the model's
parameters and buffers (held anyway).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _storage_key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return (tensor.device.type, tensor.device.index, storage.data_ptr())


def saved_activation_bytes(forward: Callable[[], torch.Tensor], model: nn.Module | None = None) -> tuple[int, torch.Tensor]:
    """Run ``forward()`` (e.g. the loss of one batch) and return (bytes of distinct storages
    saved for backward, its result); the caller may then call ``backward()`` on it."""
    held = set()
    if model is not None:
        held = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    sizes: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in held and tensor.device.type != "meta":
            sizes[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    return sum(sizes.values()), result


def live_activation_bytes(forward: Callable[[], torch.Tensor], model: nn.Module | None = None) -> tuple[int, torch.Tensor]:
    """Run ``forward()`` and return (bytes of the storages its operators created that are
    still alive after it returned, its result)."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    held = set()
    if model is not None:
        held = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    created: dict[tuple, tuple] = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                    key = _storage_key(tensor)
                    # an address freed and reused by a later storage: keep the later one
                    if key not in held and (key not in created or created[key][0].expired()):
                        storage = tensor.untyped_storage()
                        created[key] = (StorageWeakRef(storage), storage.nbytes())
            return out

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in held and key not in created and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            created[key] = (StorageWeakRef(storage), storage.nbytes())
        return tensor

    with Record(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    gc.collect()
    return sum(size for ref, size in created.values() if not ref.expired()), result


__all__ = ["saved_activation_bytes", "live_activation_bytes"]
