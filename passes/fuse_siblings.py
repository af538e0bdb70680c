"""Sibling fusion: adapter sites that read the same input share their down-projection.

LoRA-style sites (``rosafx::lowrank_linear``: lora, lora-ga, rosa) on one input, e.g.
BERT's query, key and value::

    lowrank_linear   = rosafx.lowrank_linear.default(x, q_w, q_b, q_A, q_B, 2.0, None)
    lowrank_linear_1 = rosafx.lowrank_linear.default(x, k_w, k_b, k_A, k_B, 2.0, None)
    lowrank_linear_2 = rosafx.lowrank_linear.default(x, v_w, v_b, v_A, v_B, 2.0, None)

become one x·[A_q; A_k; A_v]ᵀ (forward) and one dH·[A_q; A_k; A_v], dHᵀ·x (backward)::

    lowrank_down_stacked = rosafx.lowrank_down_stacked.default(x, [q_A, k_A, v_A])
    getitem = lowrank_down_stacked[0]; getitem_1 = …[1]; getitem_2 = …[2]
    lowrank_linear   = rosafx.lowrank_linear_given_h.default(x, q_w, q_b, q_B, 2.0, getitem)
    …

VeRA sites on one input with the same A slice (same in_features) share h = x·A_slᵀ, which
only their d and b gradients read::

    vera_project = rosafx.vera_project.default(x, vera_A, 384)
    vera_linear  = rosafx.vera_linear_given_h.default(x, q_w, q_b, vera_A, vera_B, q_d, q_b, None, vera_project)

Only the nodes change: every Parameter stays where it was (the A's stay separate), each
site keeps its node with ``(x, weight, bias, …)`` first and its site mark (rosafx/graph/adapted_graph.py),
so merge, calibrate, save (rosafx and PEFT formats) and ``lower`` work on a fused graph
(``lower`` leaves the fused ops on torch). Sites with their own dropout input are not
fused (each has its own mask). The module is changed in place and returned, so an
optimizer built before keeps training the same tensors. ``rosafx.load`` gives an unfused
graph; fuse it again.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from rosafx.graph.adapted_graph import FUSED, adapter_nodes, adapters_of, call_args, site_of
from rosafx.ops import siblings as _siblings_ops  # noqa: F401  (registers the fused ops)

rosafx_ops = torch.ops.rosafx


def _lowrank_key(node: fx.Node):
    """Sites that may share a stacked down-projection: plain lowrank_linear reading x itself."""
    if node.target is not rosafx_ops.lowrank_linear.default or len(node.args) < 7 or node.args[6] is not None:
        return None
    return ("lowrank", call_args(node)[0])


def _vera_key(node: fx.Node, gm: fx.GraphModule):
    if node.target is not rosafx_ops.vera_linear.default or (len(node.args) > 7 and node.args[7] is not None):
        return None
    return ("vera", call_args(node)[0], node.args[3].target, _in_features(node, gm))


def _in_features(node: fx.Node, gm: fx.GraphModule) -> int:
    return adapters_of(gm)[site_of(node)].in_features


def sibling_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Groups of two or more adapter nodes that can share their down-projection, in graph order."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in adapter_nodes(gm):
        key = _lowrank_key(node) or _vera_key(node, gm)
        if key is not None:
            groups.setdefault(key, []).append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def _tag(node: fx.Node, like: fx.Node) -> fx.Node:
    node.meta[FUSED] = True
    if "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = like.meta["nn_module_stack"]
    return node


def _fuse_lowrank(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    first = nodes[0]
    with graph.inserting_before(first):
        As = [graph.get_attr(n.args[3].target) for n in nodes]
        stacked = _tag(graph.call_function(rosafx_ops.lowrank_down_stacked.default, (call_args(first)[0], As)), first)
        hs = [_tag(graph.call_function(operator.getitem, (stacked, i)), first) for i in range(len(nodes))]
    for node, h in zip(nodes, hs):
        x, weight, bias, _, B, scale = node.args[:6]
        with graph.inserting_before(node):
            fused = graph.call_function(rosafx_ops.lowrank_linear_given_h.default, (x, weight, bias, B, scale, h))
        fused.meta = dict(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)


def _fuse_vera(graph: fx.Graph, nodes: list[fx.Node], in_features: int) -> None:
    first = nodes[0]
    with graph.inserting_before(first):
        A_shared = graph.get_attr(first.args[3].target)
        h = _tag(graph.call_function(rosafx_ops.vera_project.default, (call_args(first)[0], A_shared, in_features)), first)
    for node in nodes:
        with graph.inserting_before(node):
            fused = graph.call_function(rosafx_ops.vera_linear_given_h.default, (*node.args[:7], None, h))
        fused.meta = dict(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)


def fuse_siblings(gm: fx.GraphModule) -> fx.GraphModule:
    for nodes in sibling_groups(gm):
        if nodes[0].target is rosafx_ops.lowrank_linear.default:
            _fuse_lowrank(gm.graph, nodes)
        else:
            _fuse_vera(gm.graph, nodes, _in_features(nodes[0], gm))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
