"""Quantize the frozen base: every linear site's weight stored packed, dequantized where it is read.

Two steps, around the adapters' insertion (rosafx/pipeline/transform.py):

1. ``round_base_weights`` (before insert): each chosen weight W is replaced, in the capture's
   own copy, by its dequantized value Ŵ = dequant(quant(W)), so everything built on the
   base from then on (rosa's SVD, vera's shapes, lora-ga's calibration) sees exactly the
   weight the quantized graph will compute with. The user's model is not touched.
2. ``store_packed`` (after insert) swaps each get_attr of W for a call of the weight's
   ``QuantizedWeight`` module (codes + scales) and drops the fp32 parameter, so the graph
   holds the packed bytes only::

       query_weight = self.query.weight
       lowrank_linear = rosafx.lowrank_linear.default(x, query_weight, query_bias, A, B, 2.0, None)
    -> query_weight = self.rosafx_quantized.query__weight()        # Ŵ, dequantized per call
       lowrank_linear = rosafx.lowrank_linear.default(x, query_weight, query_bias, A, B, 2.0, None)

While the module runs forward, autograd saves a dequantized weight as a reference to its
packed module and dequantizes again in the backward (``saving_packed``): without that, the
adapter ops and linears would keep an fp32 copy of every weight alive until the backward,
and a training step would hold as much as on the fp32 base (bench/quantized_base.py).

Which weights: every 2-D site weight outside the ``full`` modules whose every reader is one of
its linear calls; a weight also read another way (GPT-2's lm_head tied to the embedding),
MoE expert weights and modules trained in full keep full precision.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from rosafx.errors import RosafxError
from rosafx.graph.adapted_graph import QUANTIZED, attr_owner, container_key, fetch_attr
from rosafx.graph.sites import WEIGHT_VIEWS, Site
from rosafx.ops.quantized import Quantization, QuantizedWeight, dequantize, saving_packed


def quantizable_weights(gm: fx.GraphModule, sites: list[Site], full: list[str]) -> list[str]:
    """The weight names ``store_packed`` may quantize (see the module docstring)."""
    calls: dict[str, set[fx.Node]] = {}
    for site in sites:
        if site.expert is None and not any(site.weight_name.startswith(m + ".") for m in full):
            calls.setdefault(site.weight_name, set()).update(site.calls)
    readers: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in calls:
            readers.setdefault(node.target, []).append(node)
    return [name for name in calls if all(_read_only_by(n, calls[name]) for n in readers.get(name, []))]


def _read_only_by(node: fx.Node, calls: set[fx.Node]) -> bool:
    return all(user in calls or (user.op == "call_function" and user.target in WEIGHT_VIEWS
                                 and _read_only_by(user, calls)) for user in node.users)


def round_base_weights(gm: fx.GraphModule, names: list[str], q: Quantization) -> dict[str, QuantizedWeight]:
    """Step 1: W -> Ŵ in the capture (a new frozen Parameter); returns each weight's packed form."""
    for name in names:
        q.check_fits(name, tuple(fetch_attr(gm, name).shape))  # every layer checked before any is packed
    packed = {}
    for name in names:
        owner, attr = attr_owner(gm, name)
        weight = getattr(owner, attr)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise RosafxError(f"Cannot quantize '{name}': only 2-D weight parameters are quantized.")
        packed[name] = QuantizedWeight(weight, q, name).to(weight.device)
        rounded = dequantize(packed[name].packed, packed[name].scales, q.scheme, weight.dtype)
        owner._parameters[attr] = nn.Parameter(rounded, requires_grad=False)
    return packed


def store_packed(gm: fx.GraphModule, packed: dict[str, QuantizedWeight]) -> fx.GraphModule:
    """Step 2: get_attr W -> call of its QuantizedWeight; the fp32 parameter leaves the module."""
    if not packed:
        return gm
    holder = nn.ModuleDict()
    gm.add_module(QUANTIZED, holder)
    graph = gm.graph
    for name, module in packed.items():
        key = container_key(name)
        holder[key] = module
        for node in [n for n in graph.nodes if n.op == "get_attr" and n.target == name]:
            with graph.inserting_before(node):
                read = graph.call_module(f"{QUANTIZED}.{key}", ())
            read.meta = dict(node.meta)
            node.replace_all_uses_with(read)
            graph.erase_node(node)
        owner, attr = attr_owner(gm, name)
        del owner._parameters[attr]
    graph.lint()
    gm.recompile()
    gm.register_forward_pre_hook(_open_saving_packed)
    gm.register_forward_hook(_close_saving_packed, always_call=True)
    return gm


def _open_saving_packed(module, args):
    if not torch.compiler.is_compiling():
        module._rosafx_saving_packed = saving_packed().__enter__()


def _close_saving_packed(module, args, output):
    saves = module.__dict__.pop("_rosafx_saving_packed", None)
    if saves is not None:
        saves.__exit__(None, None, None)
