"""Insert adapters: each call of a selected site becomes one call of the adapter's op.

Before (BERT query)::

    linear = aten.linear.default(x, query_weight, query_bias)

After (lora)::

    lora_A = self.rosafx_adapters.encoder__layer__0__attention__self__query.lora_A
    lora_B = self.rosafx_adapters.encoder__layer__0__attention__self__query.lora_B
    lowrank_linear = rosafx.lowrank_linear.default(x, query_weight, query_bias, lora_A, lora_B, 2.0, None)

Argument positions and the stored layout come from the site-form table (rosafx/sites.py):
a site whose W is stored in x out (Conv1D's ``addmm(b, x, W)``, ``x @ W``) reads
``aten.t(W)``; views between W and the call (Falcon's ``numpy_T``) are dropped. Every
adapter op takes ``(x, weight, bias, ...)`` with the weight out x in, so later passes can
find and swap it; the node's ``meta["rosafx"]`` records the form, so that merge can write
the original call again.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from rosafx.methods.base import Adapter, GraphEmitter
from rosafx.sites import Site, arg_at, form_constants, match_site_call

ADAPTERS = "rosafx_adapters"


def adapter_key(path: str) -> str:
    return path.replace(".", "__") or "root"


def insert_adapters(gm: fx.GraphModule, sites: list[Site], adapters: list[Adapter]) -> fx.GraphModule:
    if not hasattr(gm, ADAPTERS):
        gm.add_submodule(ADAPTERS, nn.ModuleDict())
    container: nn.ModuleDict = getattr(gm, ADAPTERS)
    graph = gm.graph
    for site, adapter in zip(sites, adapters):
        key = adapter_key(site.path)
        container[key] = adapter
        emitter = GraphEmitter(graph, f"{ADAPTERS}.{key}")
        for call in site.calls:
            match = match_site_call(call)
            form = match.form
            x = arg_at(call, form.x)
            bias = arg_at(call, form.bias) if form.bias is not None else None
            with graph.inserting_before(call):
                if "base_weight" in adapter._buffers:
                    weight = emitter.attr("base_weight")
                elif site.transposed:
                    weight = graph.call_function(torch.ops.aten.t.default, (match.weight,))
                else:
                    weight = match.weight
                out = adapter.emit(emitter, x, weight, bias)
            out.meta.update({k: v for k, v in call.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
            out.meta["rosafx"] = {"site": site.path, "key": key, "form": form.name, "transposed": site.transposed,
                                  "form_args": form_constants(call), "weight_name": site.weight_name}
            call.replace_all_uses_with(out)
            graph.erase_node(call)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def adapter_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if "rosafx" in n.meta and n.op == "call_function"]


def adapters_of(gm: fx.GraphModule) -> dict[str, Adapter]:
    container = getattr(gm, ADAPTERS, None)
    return dict(container.items()) if container is not None else {}


def site_weight(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, bool]:
    """The leaf tensor an adapter node reads as W (``args[1]``), and whether it reads it
    through the transpose ``insert_adapters`` wrote (W stored in x out)."""
    weight_node = node.args[1]
    transposed = weight_node.op != "get_attr"  # insert writes get_attr W or aten.t(get_attr W)
    target = weight_node.args[0].target if transposed else weight_node.target
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name), transposed


def set_base_weight(gm: fx.GraphModule, key: str, weight: torch.Tensor) -> None:
    """Give a site its own frozen weight (out x in) and point its op nodes at it."""
    adapter = adapters_of(gm)[key]
    adapter.register_buffer("base_weight", weight.detach().clone())
    prefix = f"{ADAPTERS}.{key}"
    for node in adapter_nodes(gm):
        if node.meta["rosafx"]["key"] != key:
            continue
        with gm.graph.inserting_before(node):
            new_weight = gm.graph.get_attr(f"{prefix}.base_weight")
        node.update_arg(1, new_weight)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
