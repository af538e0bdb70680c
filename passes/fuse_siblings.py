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

from torch import fx

from rosafx.graph.adapted_graph import FUSED, adapter_nodes, adapters_of, site_of
from rosafx.ops import roles
from rosafx.ops.siblings import FUSIONS, SiblingFusion
from rosafx.ops.spec import REFERENCE


def _fusion(node: fx.Node) -> SiblingFusion | None:
    """The node's fusion: its op's reference implementation has one, reading x itself."""
    spec = roles.spec_of(node.target)
    if spec is None or spec.name not in FUSIONS or node.target is not spec.ops.get(REFERENCE):
        return None
    return FUSIONS[spec.name] if roles.arg(node, "adapter_input") is None else None


def _group_key(node: fx.Node, gm: fx.GraphModule):
    """Sites with one key share one down-projection call: the same op and input, and when the
    down is shared rather than stacked, the same down tensor and slice of it."""
    fusion = _fusion(node)
    if fusion is None:
        return None
    key = (fusion, roles.arg(node, "input"))
    return key if fusion.stacked else key + (roles.arg(node, "down").target, _in_features(node, gm))


def _in_features(node: fx.Node, gm: fx.GraphModule) -> int:
    return adapters_of(gm)[site_of(node)].in_features


def sibling_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Groups of two or more adapter nodes that can share their down-projection, in graph order."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in adapter_nodes(gm):
        key = _group_key(node, gm)
        if key is not None:
            groups.setdefault(key, []).append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def _tag(node: fx.Node, like: fx.Node) -> fx.Node:
    node.meta[FUSED] = True
    if "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = like.meta["nn_module_stack"]
    return node


def _fuse(gm: fx.GraphModule, nodes: list[fx.Node], fusion: SiblingFusion) -> None:
    graph, first = gm.graph, nodes[0]
    with graph.inserting_before(first):     # the downs are read again here, before the first site
        downs = [graph.get_attr(roles.arg(n, "down").target) for n in (nodes if fusion.stacked else nodes[:1])]
        shared = {"input": roles.arg(first, "input"), "down": downs if fusion.stacked else downs[0],
                  "in_features": _in_features(first, gm)}
        down = _tag(graph.call_function(fusion.down.ops[REFERENCE], roles.call(fusion.down, shared)), first)
        hs = [_tag(graph.call_function(operator.getitem, (down, i)), first) for i in range(len(nodes))] \
            if fusion.stacked else [down] * len(nodes)
    for node, h in zip(nodes, hs):
        own = {role: roles.arg(node, role) for role in fusion.given_h.roles if roles.has_role(node, role)}
        with graph.inserting_before(node):
            fused = graph.call_function(fusion.given_h.ops[REFERENCE],
                                        roles.call(fusion.given_h, {**own, "adapter_input": None, "down_output": h}))
        fused.meta = dict(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)


def fuse_siblings(gm: fx.GraphModule) -> fx.GraphModule:
    for nodes in sibling_groups(gm):
        _fuse(gm, nodes, _fusion(nodes[0]))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
