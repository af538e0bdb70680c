"""The adapted graph: where adapters live, how a node names its site, the site's weight.

Every pass, the serializers and the CLI read and change an adapted graph through this
module; each fact is kept once:

* a site is named by its **path** (``encoder.layer.0.attention.self.query``), the name rules
  select; ``adapters_of(gm)`` maps path -> adapter (the ``ModuleDict`` key under
  ``rosafx_adapters`` is an encoding of the path that only this module reads);
* the graph's record ``gm.meta["rosafx"]`` holds the ``Plan`` (site -> method config, and
  the modules trained in full; the configs are the adapters' own config objects), each
  adapted site's weight (``weight_name``, and ``stored_in_out`` when W is stored in x out),
  the example inputs and the fingerprint of the base weights;
* an adapter node (``node.meta["rosafx"]``) holds only its site path and what merge needs
  to write its call again (the site form and the call's constant arguments);
* every adapter op reads x, W (out x in) and bias in the arguments its spec names in the roles
  ``input``, ``weight`` and ``bias`` (rosafx/ops/roles.py); a W stored in x out is read
  through ``aten.t`` (the site-form table's ``ADAPTER_CALL``);
* every ``node.meta`` / ``gm.meta`` key rosafx writes is declared here (``META``,
  ``EXPERT_PART``, ``EXPERT_GROUP``, ``FUSED``);
* a quantized base (passes/quantize.py) reads each packed weight through a ``call_module`` of
  its ``QuantizedWeight`` under ``rosafx_quantized`` (``quantized_weights``); ``site_weight``
  gives the dequantized tensor, and the record's ``quantize`` says the scheme.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from rosafx.graph.sites import WEIGHT_VIEWS
from rosafx.ops import roles

ADAPTERS = "rosafx_adapters"   # nn.ModuleDict on the graph module: one adapter per site
SHARED = "rosafx_shared"       # state shared by several sites (VeRA's random pair)
QUANTIZED = "rosafx_quantized" # nn.ModuleDict: one QuantizedWeight per packed base weight
# Every node.meta / gm.meta key rosafx writes, declared here once; passes import them, never spell them.
META = "rosafx"                         # gm.meta: the record; node.meta: an adapter node's site
EXPERT_PART = "rosafx_expert_part"      # node.meta: a node insert_experts added for one expert (merge drops it)
EXPERT_GROUP = "rosafx_experts"         # node.meta of W_eff: {"weight_name", "sites": expert -> site path}
FUSED = "rosafx_fused"                  # node.meta: a node fuse_siblings added (merge drops it)


def container_key(path: str) -> str:
    """The ModuleDict key of ``path``'s adapter (a ModuleDict key may not hold dots)."""
    return path.replace(".", "__") or "root"


# ---------------------------------------------------------------- the graph's record
def make_record(plan, weights: dict[str, tuple[str, bool]], example_inputs, fingerprint: str, **extra) -> dict:
    """``weights``: adapted site path -> (weight_name, W stored in x out)."""
    return {"plan": plan,
            "sites": {p: {"weight_name": w, "stored_in_out": t} for p, (w, t) in weights.items()},
            "example_inputs": example_inputs, "fingerprint": fingerprint, **extra}


def record(gm) -> dict:
    return gm.meta[META]


def is_adapted(model) -> bool:
    return META in getattr(model, "meta", {})


def plan_of(gm):
    return record(gm)["plan"]


def weight_name(gm, path: str) -> str:
    return record(gm)["sites"][path]["weight_name"]


def stored_in_out(gm, path: str) -> bool:
    return record(gm)["sites"][path]["stored_in_out"]


# ---------------------------------------------------------------- adapters
def container(gm: nn.Module) -> nn.ModuleDict:
    if not hasattr(gm, ADAPTERS):
        gm.add_module(ADAPTERS, nn.ModuleDict())
    return getattr(gm, ADAPTERS)


def add_adapter(gm: nn.Module, path: str, adapter: nn.Module) -> str:
    """Put ``adapter`` under ``rosafx_adapters``; returns the prefix its tensors are read at."""
    key = container_key(path)
    container(gm)[key] = adapter
    return f"{ADAPTERS}.{key}"


def adapters_of(gm: nn.Module) -> dict[str, nn.Module]:
    """Site path -> adapter."""
    found = getattr(gm, ADAPTERS, None)
    return {a.site_path: a for a in found.values()} if found is not None else {}


def adapter_prefix(path: str) -> str:
    return f"{ADAPTERS}.{container_key(path)}"


def adapter_tensor_name(path: str, tensor: str) -> str:
    """The name an adapter tensor has in the module's state (and in rosafx's adapter file)."""
    return f"{adapter_prefix(path)}.{tensor}"


def site_for_key(gm: nn.Module, key: str) -> str | None:
    """The site path of the adapter stored under ``key`` (None: no such adapter)."""
    found = getattr(gm, ADAPTERS, None)
    return found[key].site_path if found is not None and key in found else None


# ---------------------------------------------------------------- nodes
def mark_node(node: fx.Node, path: str, form: str, form_args: list) -> None:
    node.meta[META] = {"site": path, "form": form, "form_args": form_args}


def is_adapter_node(node: fx.Node) -> bool:
    return node.op == "call_function" and META in node.meta


def adapter_nodes(gm_or_graph) -> list[fx.Node]:
    graph = gm_or_graph.graph if isinstance(gm_or_graph, nn.Module) else gm_or_graph
    return [n for n in graph.nodes if is_adapter_node(n)]


def site_of(node: fx.Node) -> str:
    return node.meta[META]["site"]


def call_args(node: fx.Node) -> tuple[Any, Any, Any]:
    """(x, W as read, bias) of an adapter node: its arguments in the roles ``roles.ADAPTER_CALL``."""
    return tuple(roles.arg(node, role) for role in roles.ADAPTER_CALL)


def attr_owner(gm: nn.Module, target: str) -> tuple[nn.Module, str]:
    """(the module holding a get_attr ``target``, the attribute's own name)."""
    owner, _, name = target.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), name


def fetch_attr(gm: nn.Module, target: str):
    """What a get_attr node with ``target`` reads (parameter, buffer or plain tensor constant)."""
    return getattr(*attr_owner(gm, target))


def _weight_read(gm: fx.GraphModule, path: str) -> tuple[fx.Node, bool]:
    """The node ``path``'s adapter nodes read W from (a get_attr, or a quantized weight's
    call_module), and whether views between flip it."""
    node = call_args(next(n for n in adapter_nodes(gm) if site_of(n) == path))[1]
    flipped = False
    while node.op == "call_function" and node.target in WEIGHT_VIEWS:
        flipped ^= WEIGHT_VIEWS[node.target][0]
        node = node.args[0]
    return node, flipped


def site_weight(gm: fx.GraphModule, path: str) -> tuple[torch.Tensor, bool]:
    """The leaf tensor ``path``'s adapter nodes read as W, and whether it is stored in x out
    (read through a transpose); the site's base_weight once a method replaced W. On a
    quantized base: the dequantized weight (the held leaf while ``holding_dequantized``)."""
    source, flipped = _weight_read(gm, path)
    if source.op == "call_module":
        return gm.get_submodule(source.target)(), flipped
    return fetch_attr(gm, source.target), flipped


def quantized_weights(gm: nn.Module) -> dict[str, nn.Module]:
    """Base weight name -> its QuantizedWeight (empty on a full-precision base)."""
    found = getattr(gm, QUANTIZED, None)
    return {m.weight_name: m for m in found.values()} if found is not None else {}


@contextmanager
def holding_dequantized(gm: fx.GraphModule, paths):
    """While open, each quantized weight that ``paths`` read is one leaf tensor (so that
    calibration can take its gradient); afterwards it dequantizes per call again."""
    held = []
    for path in paths:
        source, _ = _weight_read(gm, path)
        if source.op == "call_module":
            module = gm.get_submodule(source.target)
            module.hold()
            held.append(module)
    try:
        yield
    finally:
        for module in held:
            module.release()


def set_base_weight(gm: fx.GraphModule, path: str, weight: torch.Tensor) -> None:
    """Give a site its own frozen weight (out x in) and point its adapter nodes at it."""
    adapter = adapters_of(gm)[path]
    adapter.register_buffer("base_weight", weight.detach().clone())
    for node in adapter_nodes(gm):
        if site_of(node) != path:
            continue
        with gm.graph.inserting_before(node):
            new_weight = gm.graph.get_attr(f"{adapter_prefix(path)}.base_weight")
        node.update_arg(roles.position(node.target, "weight"), new_weight)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def fingerprint(gm: nn.Module, weight_names: list[str]) -> str:
    """A hash of the base weights the adapters were built on (shape, dtype and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(weight_names):  # an expert weight is named once per expert, as saved files expect
        weight = gm.get_parameter(name).detach()
        digest.update(f"{name}:{tuple(weight.shape)}:{weight.dtype}".encode())
        digest.update(weight.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
