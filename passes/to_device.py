"""To device: move a captured graph, its weights and its adapters to another device.

torch.export bakes the capture's device into the graph (``arange(..., device=cpu)``,
``_assert_tensor_metadata(..., device=cpu)``, ``to(..., device=cpu)``), so ``gm.to("cuda")``
alone moves the weights but leaves those calls making CPU tensors. This pass rewrites every
``torch.device`` argument of the old device to the new one, then moves parameters, buffers
and the tensor constants that torch.export stores as plain attributes (``gm.to`` skips
those)::

    arange = aten.arange.default(7, device=cpu, pin_memory=False)
 -> arange = aten.arange.default(7, device=cuda:0, pin_memory=False)

In place (optimizers built afterwards see the moved tensors), and returned. The example
inputs kept in ``gm.meta`` stay where they were: they serve a later capture of the user's
own (CPU) model by ``rosafx.load``.
"""
from __future__ import annotations

import torch
from torch import fx

from rosafx.graph.adapted_graph import attr_owner


def _moved(value, old: torch.device, new: torch.device):
    if isinstance(value, torch.device):
        return new if value.type == old.type else value
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, old, new) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    return value


def to_device(gm: fx.GraphModule, device: torch.device | str) -> fx.GraphModule:
    new = torch.device(device)
    if new.type == "cuda" and new.index is None:
        new = torch.device("cuda", torch.cuda.current_device())
    old = next(iter(gm.parameters()), torch.empty(0)).device
    for node in gm.graph.nodes:
        node.args = _moved(node.args, old, new)
        node.kwargs = _moved(node.kwargs, old, new)
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, name = attr_owner(gm, node.target)
        value = getattr(owner, name, None)
        if isinstance(value, torch.Tensor) and name not in owner._parameters and name not in owner._buffers:
            setattr(owner, name, value.to(new))
    gm.to(new)
    gm.graph.lint()
    gm.recompile()
    return gm
