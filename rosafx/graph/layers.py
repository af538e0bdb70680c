"""Layer structure of a captured graph: which nodes belong to which repeated block.

The adapted model is one flat graph, but ``torch.export`` records on every node the stack
of modules it was called from (``node.meta["nn_module_stack"]``: ``{key: (path, type)}``,
outermost first). A *layer* is the outermost module on that stack that is an element of a
container of repeated blocks: its path ends in an index (``encoder.layer.3``,
``model.layers.12``, ``transformer.h.0``) and its parent holds at least two such
elements in the graph. Nested containers (MoE experts inside a layer) stay inside their
layer. A layer's nodes form one contiguous run of the graph; a block that is called twice
(weights shared across depth) gives two runs with the same path.

Nodes rosafx inserts copy the meta of the node they replace; a node with no record
between two nodes of the same layer belongs to that layer. ``get_attr`` nodes (parameter
reads) belong to no layer: they are pure and can be read anywhere.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

from torch import fx

from rosafx.errors import RosafxError

NO_LAYERS = ("found no layer structure in this graph: per-layer tools (activation checkpointing) need the "
             "module records torch.export leaves on each node (nn_module_stack) inside a container of "
             "repeated blocks (a ModuleList such as encoder.layer.N, model.layers.N, transformer.h.N). "
             "Transformers captured by rosafx.transform/rosafx.load from their nn.Module have them; a model "
             "with no repeated blocks, a graph built by hand or one whose node meta was dropped has none. "
             "Train without grad_checkpoint, or capture the model again from its nn.Module.")


@dataclasses.dataclass
class LayerRun:
    """One contiguous run of a layer's nodes in graph order."""
    path: str               # the layer's module path, e.g. "encoder.layer.3"
    nodes: list[fx.Node]


def _indexed_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else None
        if isinstance(path, str) and "." in path and path.rsplit(".", 1)[1].isdigit():
            paths.append(path)
    return paths


def _repeated_parents(graph: fx.Graph) -> set[str]:
    """Module paths holding at least two indexed children that have nodes in the graph."""
    children = defaultdict(set)
    for node in graph.nodes:
        for path in _indexed_paths(node):
            parent, index = path.rsplit(".", 1)
            children[parent].add(index)
    return {parent for parent, indices in children.items() if len(indices) >= 2}


def layer_tags(graph: fx.Graph) -> dict[fx.Node, str | None]:
    """Each computing node (not placeholder, get_attr or output) -> its layer path or None."""
    repeated = _repeated_parents(graph)
    computing = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    tags: dict[fx.Node, str | None] = {}
    for node in computing:
        tags[node] = next((p for p in _indexed_paths(node) if p.rsplit(".", 1)[0] in repeated), None)
    # a node with no record between two nodes of one layer is that layer's (inserted by a pass)
    known = [i for i, n in enumerate(computing) if n.meta.get("nn_module_stack")]
    for before, after in zip(known, known[1:]):
        tag = tags[computing[before]]
        if tag is not None and tags[computing[after]] == tag:
            for i in range(before + 1, after):
                if not computing[i].meta.get("nn_module_stack"):
                    tags[computing[i]] = tag
    return tags


def layer_runs(gm: fx.GraphModule) -> list[LayerRun]:
    """The graph's layers as contiguous runs of computing nodes, in graph order. Raises
    ``RosafxError`` when there are none."""
    if not isinstance(gm, fx.GraphModule):
        raise RosafxError(f"per-layer tools work on one captured graph (an fx.GraphModule), not "
                          f"{type(gm).__name__}; a partly captured model (graph breaks) has no single graph.")
    tags = layer_tags(gm.graph)
    runs: list[LayerRun] = []
    for node in gm.graph.nodes:
        if node not in tags:
            continue
        tag = tags[node]
        if tag is None:
            continue
        if runs and runs[-1].path == tag and runs[-1].nodes[-1] is _previous_computing(node, tags):
            runs[-1].nodes.append(node)
        else:
            runs.append(LayerRun(tag, [node]))
    if not runs:
        raise RosafxError(NO_LAYERS)
    return runs


def _previous_computing(node: fx.Node, tags: dict) -> fx.Node | None:
    previous = node.prev
    while previous.op != "root" and previous not in tags:
        previous = previous.prev
    return previous if previous.op != "root" else None


__all__ = ["LayerRun", "layer_runs", "layer_tags", "NO_LAYERS"]
