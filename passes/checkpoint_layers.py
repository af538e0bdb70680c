"""Checkpoint layers: a training view of an adapted graph that recomputes each layer's
activations in the backward instead of keeping them.

Each contiguous run of a layer's nodes (``rosafx/graph/layers.py``) is cut out into its own
small graph, called through ``torch.utils.checkpoint`` (non-reentrant): the forward keeps
only the layer's inputs, the backward reruns the layer to rebuild what it needs. The CPU
and CUDA RNG states are restored for the rerun, so dropout draws the same mask twice.

The result is a new GraphModule, built for training only and never saved. It holds no
tensor of its own: its submodules are the adapted model's own (the same objects), and
every parameter is read in the outer graph (``get_attr`` nodes, hoisted to the top) and
passed to the layers, so a Parameter that a life cycle replaces on an adapter module is
seen at the next call. A change of the adapted graph itself (``recompile``) needs a new
view: ``rosafx/training/activation_checkpointing.py`` keeps it current.
"""
from __future__ import annotations

import copy
import functools
import operator

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from rosafx.errors import RosafxError
from rosafx.graph.layers import LayerRun, layer_runs

PREFIX = "rosafx_checkpoint_"

_ATTENTION = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
# mode -> the ATen ops whose outputs a checkpointed layer keeps (everything else is recomputed).
# "attention": the fused attention kernels' outputs (B x S x H and a log-sum-exp per row):
# little memory, and the kernel with the S^2 work is not run again in the backward.
KEPT_OPS = {
    "full": (),
    "attention": tuple(getattr(torch.ops.aten, name).default for name in _ATTENTION
                       if hasattr(torch.ops.aten, name)),
}


class CheckpointedLayer(nn.Module):
    """Calls ``body`` (a layer's graph: its inputs -> a tuple of its outputs) under
    non-reentrant activation checkpointing when gradients are on, keeping the outputs of
    ``kept_ops`` (selective checkpointing) and recomputing the rest."""

    def __init__(self, body: fx.GraphModule, path: str, kept_ops: tuple = ()):
        super().__init__()
        self.body, self.path, self.kept_ops = body, path, kept_ops

    def forward(self, *inputs):
        if not torch.is_grad_enabled():
            return self.body(*inputs)
        options = {}
        if self.kept_ops:
            options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, list(self.kept_ops))
        return checkpoint(self.body, *inputs, use_reentrant=False, preserve_rng_state=True, **options)

    def extra_repr(self) -> str:
        return self.path


def checkpoint_layers(gm: fx.GraphModule, mode: str = "full") -> fx.GraphModule:
    """A new GraphModule computing what ``gm`` computes, each layer under activation
    checkpointing (``mode``: a key of ``KEPT_OPS``); ``gm`` is not changed."""
    if mode not in KEPT_OPS:
        raise RosafxError(f"grad_checkpoint mode {mode!r} is not one of {sorted(KEPT_OPS)}.")
    runs = layer_runs(gm)
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # the captured model's input and output pytrees
    env: dict[fx.Node, fx.Node] = {}
    nodes = list(gm.graph.nodes)
    # placeholders, then every parameter read (pure, so order does not matter), then the rest
    for node in [n for n in nodes if n.op == "placeholder"] + [n for n in nodes if n.op == "get_attr"]:
        env[node] = graph.node_copy(node, env.__getitem__)
    first_of = {run.nodes[0]: i for i, run in enumerate(runs)}
    inside = {node for run in runs for node in run.nodes}
    bodies: dict[str, CheckpointedLayer] = {}
    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node in first_of:
            index = first_of[node]
            name = f"{PREFIX}{index}"
            bodies[name] = _call_layer(gm, runs[index], graph, env, name, KEPT_OPS[mode])
        elif node not in inside:
            env[node] = graph.node_copy(node, env.__getitem__)
    root = _live_root(gm, graph, bodies)
    view = fx.GraphModule(root, graph, class_name="RosafxCheckpointedView")
    _share_children(gm, view)
    view.train(gm.training)
    return view


def _call_layer(gm: fx.GraphModule, run: LayerRun, graph: fx.Graph, env: dict, name: str,
                kept_ops: tuple) -> CheckpointedLayer:
    members = set(run.nodes)
    inputs: list[fx.Node] = []
    for node in run.nodes:
        for source in node.all_input_nodes:
            if source not in members and source not in inputs:
                inputs.append(source)
    outputs = [n for n in run.nodes if any(user not in members for user in n.users)]
    _refuse_input_mutation(run, inputs)
    body_graph = fx.Graph()
    body_env: dict[fx.Node, fx.Node] = {}
    for source in inputs:
        body_env[source] = body_graph.placeholder(source.name)
    for node in run.nodes:
        body_env[node] = body_graph.node_copy(node, body_env.__getitem__)
    body_graph.output(tuple(body_env[n] for n in outputs))
    body = fx.GraphModule(gm, body_graph, class_name="RosafxLayer")
    _share_children(gm, body)
    call = graph.call_module(name, tuple(env[s] for s in inputs))
    for i, node in enumerate(outputs):
        env[node] = graph.call_function(operator.getitem, (call, i))
        env[node].meta = dict(node.meta)
    return CheckpointedLayer(body, run.path, kept_ops)


def _refuse_input_mutation(run: LayerRun, inputs: list[fx.Node]) -> None:
    """A layer that writes into one of its inputs would write twice when it is rerun."""
    outside = set(inputs)
    for node in run.nodes:
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            continue
        for argument, value in zip(schema.arguments, node.args):
            if argument.alias_info is not None and argument.alias_info.is_write and value in outside:
                raise RosafxError(f"layer {run.path} writes in place into its input {value.name} "
                                  f"({node.target}); it cannot be recomputed under activation checkpointing. "
                                  "Train without grad_checkpoint.")


def _live_root(gm: fx.GraphModule, graph: fx.Graph, bodies: dict[str, nn.Module]) -> nn.Module:
    """A module holding, under the same names, what the outer graph reads from ``gm``."""
    root = nn.Module()
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in bodies:
            top = node.target.split(".", 1)[0]
            value = getattr(gm, top)
            if isinstance(value, nn.Module):
                root.add_module(top, value)
            else:
                setattr(root, top, value)
    for name, body in bodies.items():
        root.add_module(name, body)
    return root


def _share_children(gm: fx.GraphModule, module: fx.GraphModule) -> None:
    """GraphModule copies only the attribute paths its graph reads, under new empty parents;
    put the adapted model's own top-level submodules back so every read is live."""
    for name, child in gm.named_children():
        if name in module._modules:
            module._modules[name] = child


__all__ = ["checkpoint_layers", "CheckpointedLayer"]
