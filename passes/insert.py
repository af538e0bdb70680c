"""Insert adapters: each call of a selected site becomes one call of the adapter's op.

Before (BERT query)::

    linear = aten.linear.default(x, query_weight, query_bias)

After (lora)::

    lora_A = self.rosafx_adapters.encoder__layer__0__attention__self__query.lora_A
    lora_B = self.rosafx_adapters.encoder__layer__0__attention__self__query.lora_B
    lowrank_linear = rosafx.lowrank_linear.default(x, query_weight, query_bias, lora_A, lora_B, 2.0, None)

Argument positions and the stored layout come from the site-form table (rosafx/graph/sites.py):
the original call's x and bias are read where its form says, and W is handed to the
adapter op as ``ADAPTER_CALL`` reads it (out x in: a W stored in x out, Conv1D's
``addmm(b, x, W)`` or ``x @ W``, goes through ``aten.t``; views between W and the call,
Falcon's ``numpy_T``, are dropped). The node is marked with its site path and form
(rosafx/graph/adapted_graph.py), so that merge can write the original call again.
"""
from __future__ import annotations

from torch import fx

from rosafx.graph.adapted_graph import add_adapter, mark_node
from rosafx.methods import get_method
from rosafx.methods.base import Adapter, GraphEmitter, MethodConfig
from rosafx.graph.sites import ADAPTER_CALL, Site, arg_at, form_constants, match_site_call, read_as

from rosafx.passes.insert_experts import check_expert_methods, insert_expert_adapters


def insert_adapters(gm: fx.GraphModule, sites: list[Site], adapters: list[Adapter]) -> fx.GraphModule:
    graph = gm.graph
    for site, adapter in zip(sites, adapters):
        emitter = GraphEmitter(graph, add_adapter(gm, site.path, adapter))
        for call in site.calls:
            match = match_site_call(call)
            form = match.form
            x = arg_at(call, form.x)
            bias = arg_at(call, form.bias) if form.bias is not None else None
            with graph.inserting_before(call):
                if "base_weight" in adapter._buffers:
                    weight = emitter.attr("base_weight")
                else:
                    weight = read_as(graph, match.weight, site.stored_in_out, ADAPTER_CALL.reads_in_out)
                out = adapter.emit(emitter, x, weight, bias)
            out.meta.update({k: v for k, v in call.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
            mark_node(out, site.path, form.name, form_constants(call))
            call.replace_all_uses_with(out)
            graph.erase_node(call)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def insert_planned(gm: fx.GraphModule, sites: list[Site], adapted: dict[str, MethodConfig]) -> fx.GraphModule:
    """The whole insert step: build each method's adapters for its planned sites and insert
    them (on calls, or on MoE expert weights: passes/insert_experts.py)."""
    by_method: dict[str, list[tuple[Site, MethodConfig]]] = {}
    for site in sites:
        if site.path in adapted:
            by_method.setdefault(adapted[site.path].method, []).append((site, adapted[site.path]))
    for method_id, pairs in by_method.items():
        check_expert_methods(pairs)
        adapters = get_method(method_id).build(gm, pairs)
        calls = [(s, a) for (s, _), a in zip(pairs, adapters) if s.expert is None]
        experts = [(s, a) for (s, _), a in zip(pairs, adapters) if s.expert is not None]
        if calls:
            gm = insert_adapters(gm, [s for s, _ in calls], [a for _, a in calls])
        if experts:
            gm = insert_expert_adapters(gm, [s for s, _ in experts], [a for _, a in experts])
    return gm
