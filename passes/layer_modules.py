"""Layer modules: give each layer of an adapted graph back its own module, owning its base
weights, so per-module tools (FSDP2's ``fully_shard``) have something to hold.

Each contiguous run of a layer's nodes (``rosafx/graph/layers.py``) becomes the graph of a small
GraphModule installed at the layer's own path (``bert.encoder.layer.3``): the base weights
under that path are read *inside* it (relative ``get_attr``), so a ``fully_shard`` of that
module gathers them just before the layer runs and frees them after. Everything else the
layer reads (hidden states, masks, the adapters under ``rosafx_adapters``, dropout
modules) comes in as an argument or a shared submodule: adapters stay whole (replicated).

The result is a new GraphModule: ``gm`` is not changed, the Parameter objects are shared
(until ``fully_shard`` replaces the layer's with sharded ones), and the parameter names
are the same as ``gm``'s. Prototype for docs/scale.md §2; a layer called twice (weights
shared across depth) is refused.
"""
from __future__ import annotations

import copy
import operator

from torch import fx, nn

from rosafx.errors import RosafxError
from rosafx.graph.layers import LayerRun, layer_runs


def layer_modules(gm: fx.GraphModule) -> fx.GraphModule:
    if "rosafx_bank" in gm._modules:   # its views come from gm's own forward hooks, which the copy has not
        raise RosafxError("layer_modules needs each adapter tensor as its own Parameter: call rosafx.unbank(model) "
                          "first (rosafx.training.fsdp.shard_layers does).")
    runs = layer_runs(gm)
    paths = [run.path for run in runs]
    if len(set(paths)) != len(paths):
        raise RosafxError("a layer is called more than once (weights shared across depth); layer modules need one "
                          "call per layer.")
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    first_of = {run.nodes[0]: run for run in runs}
    inside = {node for run in runs for node in run.nodes}
    owned = {node for node in gm.graph.nodes if node.op == "get_attr" and _owner(node.target, paths)}
    layer_bodies: dict[str, fx.GraphModule] = {}
    nodes = list(gm.graph.nodes)
    # placeholders, then the parameter reads no layer owns (pure, hoisted), then the rest
    for node in [n for n in nodes if n.op == "placeholder"] + [n for n in nodes if n.op == "get_attr"]:
        if node not in owned:
            env[node] = graph.node_copy(node, env.__getitem__)
    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node in first_of:
            run = first_of[node]
            layer_bodies[run.path] = _call_layer(gm, run, graph, env, owned)
        elif node not in inside:
            env[node] = graph.node_copy(node, env.__getitem__)
    structured = fx.GraphModule(gm, graph, class_name="RosafxLayered")
    for path, body in layer_bodies.items():
        parent, _, name = path.rpartition(".")
        structured.get_submodule(parent).register_module(name, body)
    _carry_unread(gm, structured)
    structured.train(gm.training)
    return structured


def _owner(target: str, paths: list[str]) -> str | None:
    return next((p for p in paths if target.startswith(p + ".")), None)


def _call_layer(gm: fx.GraphModule, run: LayerRun, graph: fx.Graph, env: dict, owned: set) -> fx.GraphModule:
    members = set(run.nodes)
    prefix = run.path + "."
    inputs: list[fx.Node] = []
    reads: list[fx.Node] = []
    for node in run.nodes:
        for source in node.all_input_nodes:
            if source in members or source in inputs or source in reads:
                continue
            if source.op == "get_attr" and source.target.startswith(prefix):
                reads.append(source)
            elif source in owned:
                raise RosafxError(f"layer {run.path} reads {source.target}, a weight of another layer.")
            else:
                inputs.append(source)
    outputs = [n for n in run.nodes if any(user not in members for user in n.users)]
    body_graph = fx.Graph()
    body_env: dict[fx.Node, fx.Node] = {}
    for source in inputs:
        body_env[source] = body_graph.placeholder(source.name)
    for source in reads:
        body_env[source] = body_graph.get_attr(source.target[len(prefix):])
    modules = {}
    for node in run.nodes:
        copied = body_graph.node_copy(node, body_env.__getitem__)
        if node.op == "call_module":  # a dropout module rosafx owns at the top: shared, under a local name
            local = "rosafx_module_" + node.target.replace(".", "_")
            modules[local] = gm.get_submodule(node.target)
            copied.target = local
        body_env[node] = copied
    body_graph.output(tuple(body_env[n] for n in outputs))
    holder = gm.get_submodule(run.path)
    root = nn.Module()
    for name, child in holder.named_children():
        root.add_module(name, child)
    for name, tensor in list(holder.named_parameters(recurse=False)) + list(holder.named_buffers(recurse=False)):
        setattr(root, name, tensor)
    for local, module in modules.items():
        root.add_module(local, module)
    body = fx.GraphModule(root, body_graph, class_name="RosafxLayer")
    call = graph.call_module(run.path, tuple(env[s] for s in inputs))
    for i, node in enumerate(outputs):
        env[node] = graph.call_function(operator.getitem, (call, i))
        env[node].meta = dict(node.meta)
    return body


def _carry_unread(gm: fx.GraphModule, structured: fx.GraphModule) -> None:
    """Parameters and buffers of ``gm`` that no node reads, under their names, so the
    state dict keeps every key."""
    have = dict(structured.named_parameters(remove_duplicate=False))
    have.update(dict(structured.named_buffers(remove_duplicate=False)))
    for name, tensor in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in have:
            continue
        parent, _, leaf = name.rpartition(".")
        module = structured
        for part in parent.split(".") if parent else []:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        if isinstance(tensor, nn.Parameter):
            module.register_parameter(leaf, tensor)
        else:
            module.register_buffer(leaf, tensor)


__all__ = ["layer_modules"]
