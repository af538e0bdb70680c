"""Merge: fold every adapter into a plain weight; adapter nodes become linear calls again.

    lowrank_linear = rosafx.lowrank_linear.default(x, W, b, lora_A, lora_B, 2.0, None)
 -> linear = aten.linear.default(x, W_merged, b)         W_merged = W + ΔW  (fp32 sum)

Each site goes back to its own form (the site-form table's ``rebuild``): a Conv1D site to
``addmm(b, x, W_merged)`` with W stored in x out, Falcon's ``x @ W.T`` to a matmul, and so
on, with the merged weight in the parameter's own layout, so the merged graph has exactly
the base graph's matmuls and its state dict the base model's shapes. Merged weights are new tensors: the adapted
model keeps working, and a weight tied elsewhere (GPT-2's lm_head = wte) is untied rather
than changed behind the user's back.

On a quantized base (passes/quantize.py) every packed weight is dequantized first, back to a
plain parameter under its own name (an fp32 get_attr where the graph called its
``QuantizedWeight``), and adapters fold into that dequantized weight: the merged graph is a
plain full-precision graph equal to the adapted one.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from rosafx.graph.adapted_graph import (ADAPTERS, EXPERT_GROUP, EXPERT_PART, FUSED, META, QUANTIZED, adapter_nodes,
                                        adapters_of, call_args, fetch_attr, is_adapter_node, site_of, site_weight,
                                        stored_in_out, weight_name)
from rosafx.errors import RosafxError
from rosafx.graph.sites import FORM_BY_NAME, WEIGHT_VIEWS

from rosafx.passes.insert_experts import expert_nodes

aten = torch.ops.aten


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, path: str) -> torch.Tensor:
    """W + ΔW accumulated in fp32, checked finite, cast back to W's dtype."""
    total = weight.detach().float() + delta.float()
    if not torch.isfinite(total).all():
        raise RosafxError(f"Merging site '{path}' gives non-finite weights; the adapter has diverged "
                          "(check the learning rate) or the base weight overflows its dtype.")
    return total.to(weight.dtype)


def merge_adapters(adapted: fx.GraphModule, *, original_weights: bool = False) -> fx.GraphModule:
    """``original_weights=True`` gives the base model instead: every site back on the user's
    own weight, no delta (used to compare latency and matmul counts with the base)."""
    adapters = adapters_of(adapted)
    if not original_weights:
        for adapter in adapters.values():
            adapter.check_ready("merge")
    graph = copy.deepcopy(adapted.graph)
    dequantized = _dequantize_reads(adapted, graph)  # a quantized base: packed weights -> plain names
    merged: dict[str, torch.Tensor] = {}
    # a merged weight takes its original name unless another node still reads the original
    # tensor there (a tied weight): then it gets a name of its own and the tie is broken
    read_elsewhere = _targets_read_elsewhere(graph)
    for node in adapter_nodes(graph):
        info, path = node.meta[META], site_of(node)
        original, in_out = weight_name(adapted, path), stored_in_out(adapted, path)
        name = original + ("_merged" if original in read_elsewhere else "")
        if name not in merged:
            if original_weights:  # already in the stored layout (a packed one dequantized above)
                merged[name] = dequantized[original] if original in dequantized else fetch_attr(adapted, original)
            else:
                leaf, reads_t = site_weight(adapted, path)
                weight = leaf.t() if reads_t else leaf                         # out x in
                total = merged_weight(weight, adapters[path].delta_weight().to(weight.device), path)
                merged[name] = total.t().contiguous() if in_out else total
        x, _, bias = call_args(node)
        with graph.inserting_before(node):
            w = graph.get_attr(name)
            plain = FORM_BY_NAME[info["form"]].rebuild(graph, x, w, bias, in_out, info["form_args"])
        plain.meta = {k: v for k, v in node.meta.items() if k != META}
        node.replace_all_uses_with(plain)
        graph.erase_node(node)
    for name, weight in dequantized.items():
        merged.setdefault(name, weight)                 # read by a site without adapter, or also elsewhere
    for node in expert_nodes(graph):
        _merge_experts(adapted, graph, node, adapters, merged, read_elsewhere, original_weights)
    _drop_unused_adapter_inputs(graph)
    root = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in root:
            root[node.target] = merged[node.target] if node.target in merged else fetch_attr(adapted, node.target)
    root = {k: (nn.Parameter(v, requires_grad=False) if isinstance(v, torch.Tensor) and k in merged else v)
            for k, v in root.items()}
    result = fx.GraphModule(root, graph, class_name="RosafxMergedModule")
    result.train(adapted.training)
    if any(ADAPTERS in t for t in root):
        raise RosafxError("Internal error: adapter tensors survived the merge.")
    graph.lint()
    return result


def _dequantize_reads(adapted: fx.GraphModule, graph: fx.Graph) -> dict[str, torch.Tensor]:
    """Each call of a QuantizedWeight -> a get_attr of its weight's own name; returns name ->
    the dequantized tensor (the merged graph's plain parameter)."""
    weights = {}
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target.startswith(QUANTIZED + ".")]:
        module = adapted.get_submodule(node.target)
        if module.weight_name not in weights:
            weights[module.weight_name] = module().detach()
        with graph.inserting_before(node):
            plain = graph.get_attr(module.weight_name)
        plain.meta = dict(node.meta)
        node.replace_all_uses_with(plain)
        graph.erase_node(node)
    return weights


def _merge_experts(adapted, graph: fx.Graph, node: fx.Node, adapters, merged: dict, read_elsewhere: set,
                   original_weights: bool) -> None:
    """W_eff = W + stack(ΔW_e) (passes/insert_experts.py) -> one plain parameter."""
    info = node.meta[EXPERT_GROUP]
    name = info["weight_name"] + ("_merged" if info["weight_name"] in read_elsewhere else "")
    original = fetch_attr(adapted, info["weight_name"])
    if original_weights:
        merged[name] = original
    else:
        delta = torch.zeros(original.shape, dtype=torch.float32, device=original.device)
        for expert, path in info["sites"].items():
            expert_delta = adapters[path].delta_weight().to(original.device)
            delta[expert] = expert_delta.t() if stored_in_out(adapted, path) else expert_delta
        merged[name] = merged_weight(original, delta, info["weight_name"])
    with graph.inserting_before(node):
        plain = graph.get_attr(name)
    node.replace_all_uses_with(plain)
    for part in reversed(list(graph.nodes)):
        if EXPERT_PART in part.meta and not part.users:
            graph.erase_node(part)


def _drop_unused_adapter_inputs(graph: fx.Graph) -> None:
    """Erase what only fed the adapter nodes: their tensors, dropout, weight transposes and
    the shared down-projections of sibling fusion (passes/fuse_siblings.py)."""
    for node in reversed(list(graph.nodes)):
        if node.users:
            continue
        if node.op == "get_attr" or (node.op == "call_module" and node.target.startswith(ADAPTERS + ".")) \
                or (node.op == "call_function" and node.target in WEIGHT_VIEWS) or node.meta.get(FUSED):
            graph.erase_node(node)


def _targets_read_elsewhere(graph: fx.Graph) -> set[str]:
    """get_attr targets that some non-adapter node reads (a tied weight's other use)."""
    read = set()
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        for user in node.users:
            feeds_adapter_only = user.op == "call_function" and user.target in WEIGHT_VIEWS \
                and all(is_adapter_node(u) for u in user.users)
            if not is_adapter_node(user) and EXPERT_PART not in user.meta and not feeds_adapter_only:
                read.add(node.target)
    return read
