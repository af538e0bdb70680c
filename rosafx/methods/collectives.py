"""Collectives the core issues while a distributed run synchronises its life cycles.

Calibration and resampling (rosafx/methods/calibration.py, the rosa method) call these; outside
``synchronised`` (one process, or a loop that does not ask for it) they do nothing, so the
core never needs to know whether it runs under torchrun. rosafx/training/distributed.py turns them on.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

_SYNC = {"on": False}  # set by ``synchronised``: calibrate/resample then issue collectives


@contextlib.contextmanager
def synchronised(on: bool):
    """Within it (when ``on``), calibration reduces gradients across ranks and rewritten
    adapters are broadcast from rank 0."""
    previous = _SYNC["on"]
    _SYNC["on"] = on
    try:
        yield
    finally:
        _SYNC["on"] = previous


def mean_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks (itself outside ``synchronised``)."""
    if not _SYNC["on"]:
        return tensor
    tensor = tensor.contiguous()
    dist.all_reduce(tensor)
    return tensor.div_(dist.get_world_size())


def broadcast_adapters(adapters: Iterable[nn.Module]) -> None:
    """Overwrite these adapters' tensors (Parameters and buffers) with rank 0's, in place."""
    if not _SYNC["on"]:
        return
    with torch.no_grad():
        for adapter in adapters:
            for tensor in adapter.state_dict().values():
                dist.broadcast(tensor, src=0)
