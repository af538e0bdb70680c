"""Activation memory: the bytes a forward keeps alive for its backward.

Every tensor autograd saves goes through the saved-tensor hooks in force, including the
layer inputs that non-reentrant activation checkpointing keeps (it saves them outside its
own hooks). What is counted is each distinct storage once, at its full size (a view saved
by several ops, or a slice of a larger buffer, counts its whole storage once), leaving out
the storages of the model's parameters and buffers: they are held anyway.
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


__all__ = ["saved_activation_bytes"]
