"""Decompose: ops with no ONNX translation -> ops ONNX has, on a plain (merged) graph.

Mixtral's grouped experts (transformers 5.x) run ``transformers::grouped_mm_fallback``, a
custom op that loops over experts in Python; the ONNX exporter has no function for it. A
grouped matmul is a per-row matmul with the row's expert weight::

    grouped_mm_fallback(x, W, offs)        x: S x in (rows sorted by expert), W: E x in x out,
                                           offs: E cumulative row counts
 -> expert[s] = #{e : offs[e] <= s}        (a compare and a sum; rows past offs[-1] clamp to E-1)
    y[s]      = x[s] · W[expert[s]]        (index_select + bmm)

which the exporter translates (Less/ReduceSum/Gather/MatMul). The table maps an op to a
plain-torch function with the same signature; the pass points each such node at it, and the
exporter traces the function into ATen. The model's outputs do not change beyond float
rounding (one matmul per row instead of one per group).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import fx


def grouped_mm_rows(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)                   # S x 1
    expert = (rows >= offs.to(rows.dtype).unsqueeze(0)).sum(dim=1)                  # S
    expert = expert.clamp(max=weight.shape[0] - 1)
    per_row = weight.index_select(0, expert)                                         # S x in x out
    return torch.bmm(x.unsqueeze(1).to(weight.dtype), per_row).squeeze(1)


def _decompositions() -> dict[object, Callable]:
    table: dict[object, Callable] = {}
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        table[fallback.default] = grouped_mm_rows
    return table


def needs_decomposition(gm: fx.GraphModule) -> bool:
    table = _decompositions()
    return any(n.op == "call_function" and n.target in table for n in gm.graph.nodes)


def decompose_for_onnx(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with every op of the table replaced (``gm`` itself if none occurs)."""
    table = _decompositions()
    if not needs_decomposition(gm):
        return gm
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in table:
            node.target = table[node.target]
    result = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    result.meta.update(gm.meta)
    result.train(gm.training)
    return result
