"""Insert adapters on MoE expert weights: the graph reads W + ΔW instead of W.

An expert parameter W (E x out x in, or E x in x out) is consumed by a grouped or batched
matmul that picks experts per token; no single call belongs to one expert. So the adapter
acts on the weight, as HF PEFT's ``target_parameters`` does::

    W = self.model.layers.0.mlp.experts.gate_up_proj
 -> d0 = mul(mm(lora_B_0, lora_A_0), s)              one per adapted expert (out x in)
    d1 = zeros_like(select(W, 0, 1))                 experts the rules left alone
    ...
    W_eff = add(W, type_as(stack([d0, d1, ...]), W)) read wherever W was

Every inserted node carries ``meta[EXPERT_PART]``; ``W_eff`` carries
``meta[EXPERT_GROUP]`` (the parameter's name, expert -> site path) for merge, which
replaces it by the plain parameter W + ΔW. Only methods whose adapter needs nothing but its
own tensors (``Method.adapts_expert_weights``) may adapt an expert.
"""
from __future__ import annotations

import torch
from torch import fx

from rosafx.graph.adapted_graph import EXPERT_GROUP, EXPERT_PART, add_adapter
from rosafx.errors import RosafxError
from rosafx.methods import get_method, methods_that
from rosafx.methods.base import Adapter, GraphEmitter
from rosafx.graph.sites import Site, read_as

aten = torch.ops.aten


def check_expert_methods(pairs) -> None:
    for site, config in pairs:
        if site.expert is not None and not get_method(config.method).adapts_expert_weights:
            raise RosafxError(f"Site '{site.path}' is an MoE expert weight; only "
                              f"{methods_that('adapts_expert_weights')} can adapt expert weights, not "
                              f"'{config.method}'. Exclude it or use lora for it.")


def insert_expert_adapters(gm: fx.GraphModule, sites: list[Site], adapters: list[Adapter]) -> fx.GraphModule:
    by_weight: dict[str, dict[int, tuple[Site, Adapter, str]]] = {}
    for site, adapter in zip(sites, adapters):
        by_weight.setdefault(site.weight_name, {})[site.expert] = (site, adapter, add_adapter(gm, site.path, adapter))
    graph = gm.graph
    for weight_name, experts in by_weight.items():
        readers = [n for n in graph.nodes if n.op == "get_attr" and n.target == weight_name]
        first_use = next(n for n in graph.nodes if any(r in n.args for r in readers)
                         or any(r in a for a in n.args if isinstance(a, (list, tuple)) for r in readers))
        num_experts = gm.get_parameter(weight_name).shape[0]
        stored_in_out = next(iter(experts.values()))[0].stored_in_out
        created = []
        with graph.inserting_before(first_use):
            weight = graph.get_attr(weight_name)
            created.append(weight)
            deltas = []
            for expert in range(num_experts):
                if expert in experts:
                    site, adapter, prefix = experts[expert]
                    before = set(graph.nodes)
                    delta = adapter.emit_delta(GraphEmitter(graph, prefix))
                    if delta is None:
                        raise RosafxError(f"Method '{adapter.config.method}' cannot adapt expert weight '{site.path}'.")
                    delta = read_as(graph, delta, False, stored_in_out)  # ΔW out x in, in W's layout
                    created += [n for n in graph.nodes if n not in before]
                else:
                    picked = graph.call_function(aten.select.int, (weight, 0, expert))
                    delta = graph.call_function(aten.zeros_like.default, (picked,))
                    created += [picked, delta]
                deltas.append(delta)
            stacked = graph.call_function(aten.stack.default, (deltas,))
            cast = graph.call_function(aten.type_as.default, (stacked, weight))
            effective = graph.call_function(aten.add.Tensor, (weight, cast))
            created += [stacked, cast, effective]
        for node in created:
            node.meta[EXPERT_PART] = True
        effective.meta[EXPERT_GROUP] = {"weight_name": weight_name, "sites": {e: s.path for e, (s, _, _) in experts.items()}}
        for reader in readers:
            reader.replace_all_uses_with(effective)
            graph.erase_node(reader)
    graph.lint()
    gm.recompile()
    return gm


def expert_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if EXPERT_GROUP in n.meta]
