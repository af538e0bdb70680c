"""Sites: every weight that the graph applies as a linear map.

A site is keyed by its weight (a ``get_attr`` target). The forms a linear map takes in an
ATen graph are a table (``SITE_FORMS``), not branches; passes read argument positions, the
stored layout and how to rebuild a call from it:

    form            call                                   W as stored     from
    linear          aten.linear(x, W, b?)                  out x in        nn.Linear, F.linear
    addmm           aten.addmm(b, x, W)                    in x out        GPT-2 Conv1D
    addmm           aten.addmm(b, x, t(W))                 out x in        a decomposed nn.Linear
    matmul          aten.matmul(x, numpy_T(W))  (+ add b)  out x in        Falcon's FalconLinear, x @ W.T
    matmul          aten.matmul(x, W)                      in x out        x @ W
    mm / bmm        aten.mm(x, t(W)), bmm(x, expand(t(W))) either          hand-written 2-D/3-D products
    einsum          aten.einsum("...i,oi->...o", [x, W])    out x in / in x out by the equation

Between the parameter and the call the weight may pass through views in ``WEIGHT_VIEWS``
(a 2-D transpose flips the layout; an ``expand`` that only adds leading dims does not). A
bias added by a separate ``add`` stays in the graph as it was: the site is the product
alone, which is exact and keeps every later pass to one node per call.

A module called twice yields one site with two call nodes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn

aten = torch.ops.aten
ArgPos = int | tuple[int, int]  # an argument index, or (index of a list argument, index inside it)


@dataclass(frozen=True)
class SiteForm:
    """One way a graph applies a weight as a linear map.

    ``reads_in_out``: the call's weight argument is in x out (``x @ W``) rather than out x in
    (``F.linear``); views in between may flip that. ``accepts`` rejects calls of the target
    that are not a plain linear map (addmm with beta/alpha, an einsum of another shape).
    ``rebuild(graph, x, w, bias, call_args)`` writes the call again with a new weight ``w`` in
    the stored layout (``call_args``: the original call's constant arguments)."""
    name: str
    target: object
    x: ArgPos
    weight: ArgPos
    bias: ArgPos | None
    reads_in_out: bool | Callable[[fx.Node], bool]
    rebuild: Callable
    accepts: Callable[[fx.Node], bool] = lambda node: True


def _plain_addmm(node: fx.Node) -> bool:
    return len(node.args) == 3 and not node.kwargs  # addmm with beta/alpha is not a plain linear map


_EINSUM = re.compile(r"^\s*(\.\.\.)?([a-zA-Z]*)([a-zA-Z])\s*,\s*([a-zA-Z])([a-zA-Z])\s*->\s*(\.\.\.)?([a-zA-Z]*)([a-zA-Z])\s*$")


def _einsum_parts(node: fx.Node):
    """(contracted letter, weight letters, output letter) of ``x..k, W -> x..o``, or None."""
    if len(node.args) != 2 or not isinstance(node.args[0], str) or not isinstance(node.args[1], (list, tuple)) \
            or len(node.args[1]) != 2:
        return None
    m = _EINSUM.match(node.args[0])
    if not m:
        return None
    dots_in, lead_in, k, w0, w1, dots_out, lead_out, o = m.groups()
    if dots_in != dots_out or lead_in != lead_out or {w0, w1} != {k, o} or k == o or o in lead_in or k in lead_in:
        return None
    return k, w0 + w1, o


def _einsum_accepts(node: fx.Node) -> bool:
    return _einsum_parts(node) is not None


def _einsum_reads_in_out(node: fx.Node) -> bool:
    k, weight_letters, o = _einsum_parts(node)
    return weight_letters == k + o


def _t(graph: fx.Graph, w: fx.Node) -> fx.Node:
    return graph.call_function(aten.t.default, (w,))


def read_as(graph, w, stored_in_out: bool, reads_in_out: bool) -> fx.Node:
    """``w`` (stored in x out or out x in) as a call reads it: transposed when the two differ."""
    return w if stored_in_out == reads_in_out else _t(graph, w)


SITE_FORMS = [
    SiteForm("linear", aten.linear.default, x=0, weight=1, bias=2, reads_in_out=False,
             rebuild=lambda g, x, w, b, stored_in_out, args: g.call_function(
                 aten.linear.default, (x, read_as(g, w, stored_in_out, False), b))),
    SiteForm("addmm", aten.addmm.default, x=1, weight=2, bias=0, reads_in_out=True, accepts=_plain_addmm,
             rebuild=lambda g, x, w, b, stored_in_out, args: g.call_function(
                 aten.addmm.default, (b, x, read_as(g, w, stored_in_out, True)))),
    SiteForm("matmul", aten.matmul.default, x=0, weight=1, bias=None, reads_in_out=True,
             rebuild=lambda g, x, w, b, stored_in_out, args: g.call_function(
                 aten.matmul.default, (x, read_as(g, w, stored_in_out, True)))),
    SiteForm("mm", aten.mm.default, x=0, weight=1, bias=None, reads_in_out=True,
             rebuild=lambda g, x, w, b, stored_in_out, args: g.call_function(
                 aten.mm.default, (x, read_as(g, w, stored_in_out, True)))),
    # bmm over a broadcast 2-D weight is x @ W per batch; matmul broadcasts the same way
    SiteForm("bmm", aten.bmm.default, x=0, weight=1, bias=None, reads_in_out=True,
             rebuild=lambda g, x, w, b, stored_in_out, args: g.call_function(
                 aten.matmul.default, (x, read_as(g, w, stored_in_out, True)))),
    SiteForm("einsum", aten.einsum.default, x=(1, 0), weight=(1, 1), bias=None,
             reads_in_out=_einsum_reads_in_out, accepts=_einsum_accepts,
             rebuild=lambda g, x, w, b, stored_in_out, args: g.call_function(
                 aten.einsum.default, (args[0], [x, w]))),
]
FORMS_BY_TARGET: dict[object, list[SiteForm]] = {}
for _form in SITE_FORMS:
    FORMS_BY_TARGET.setdefault(_form.target, []).append(_form)
FORM_BY_NAME = {form.name: form for form in SITE_FORMS}


@dataclass(frozen=True)
class AdapterCall:
    """How every adapter op (``rosafx/ops``) reads W: out x in, so a W stored in x out is passed
    through ``aten.t`` (a ``WEIGHT_VIEWS`` view). Which arguments hold x, W and bias, each op's
    spec says (its roles, rosafx/ops/roles.py)."""
    reads_in_out: bool = False


ADAPTER_CALL = AdapterCall()


def _is_2d_transpose(node: fx.Node) -> bool:
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target is aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return True


def _expand_adds_leading_dims(node: fx.Node) -> bool:
    size, source = node.args[1], node.args[0]
    val = source.meta.get("val") if isinstance(source, fx.Node) else None
    if val is None or val.dim() != 2 or not isinstance(size, (list, tuple)) or len(size) < 2:
        return False
    return all(s == -1 or s == d for s, d in zip(list(size)[-2:], val.shape))


# views a weight may pass through on its way to the call: op -> (flips the layout?, valid here?)
WEIGHT_VIEWS: dict[object, tuple[bool, Callable[[fx.Node], bool]]] = {
    aten.t.default: (True, lambda n: True),
    aten.numpy_T.default: (True, lambda n: True),
    aten.permute.default: (True, _is_2d_transpose),
    aten.transpose.int: (True, _is_2d_transpose),
    aten.expand.default: (False, _expand_adds_leading_dims),
}


def arg_at(node: fx.Node, pos: ArgPos):
    if isinstance(pos, tuple):
        outer = node.args[pos[0]] if len(node.args) > pos[0] else None
        return outer[pos[1]] if isinstance(outer, (list, tuple)) and len(outer) > pos[1] else None
    return node.args[pos] if len(node.args) > pos else None


def form_constants(node: fx.Node) -> list:
    """The call's arguments that are not nodes (kept so that ``rebuild`` can write them back)."""
    return [a if not isinstance(a, (fx.Node, list, tuple)) else None for a in node.args]


@dataclass
class Site:
    path: str                 # module path the rules match against, e.g. "encoder.layer.0.attention.self.query"
    weight_name: str          # get_attr target of W
    module_type: str          # qualified class name of the owning module ("" if unknown)
    in_features: int
    out_features: int
    stored_in_out: bool       # W is stored in x out (Conv1D, x @ W) rather than out x in
    dtype: torch.dtype
    calls: list[fx.Node] = field(default_factory=list)
    form: str = "linear"      # SITE_FORMS name of the first call, or "expert"
    expert: int | None = None # index into a 3-D expert parameter (E x out x in); None for a 2-D weight


@dataclass(frozen=True)
class SiteCall:
    """A matched call: its form, the weight's get_attr node and whether W is stored in x out."""
    form: SiteForm
    weight: fx.Node
    stored_in_out: bool


def _module_stack_entry(node: fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, module_type = list(stack.values())[-1]
    path = re.sub(r"@\d+", "", path)  # a module called twice is recorded as "name@1"
    module_type = module_type if isinstance(module_type, str) else f"{module_type.__module__}.{module_type.__qualname__}"
    return path, module_type


def _site_path(weight_name: str, stack_entry: tuple[str, str] | None) -> tuple[str, str]:
    """A weight called ``<module>.weight`` is named by its module, any other by itself."""
    if stack_entry is not None:
        path, module_type = stack_entry
        if weight_name.endswith(".weight") or weight_name == "weight":
            return path, module_type
    module_path = weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name
    return module_path, ""


def weight_source(node) -> tuple[fx.Node, bool] | None:
    """Follow ``WEIGHT_VIEWS`` back to a get_attr: (that node, whether the views flip W)."""
    flipped = False
    while isinstance(node, fx.Node) and node.op == "call_function":
        view = WEIGHT_VIEWS.get(node.target)
        if view is None or not view[1](node):
            return None
        flipped ^= view[0]
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node, flipped
    return None


def match_site_call(node: fx.Node) -> SiteCall | None:
    if node.op != "call_function":
        return None
    for form in FORMS_BY_TARGET.get(node.target, ()):
        if not form.accepts(node):
            continue
        source = weight_source(arg_at(node, form.weight))
        if source is None or not isinstance(arg_at(node, form.x), fx.Node):
            continue
        reads_in_out = form.reads_in_out(node) if callable(form.reads_in_out) else form.reads_in_out
        return SiteCall(form, source[0], reads_in_out ^ source[1])
    return None


def find_sites(gm: fx.GraphModule) -> list[Site]:
    sites: dict[str, Site] = {}
    for node in gm.graph.nodes:
        match = match_site_call(node)
        if match is None:
            continue
        key = match.weight.target
        weight = gm.get_parameter(key) if is_parameter(gm, key) else None
        if weight is None or weight.dim() != 2:
            continue
        if key in sites and sites[key].stored_in_out != match.stored_in_out:
            continue  # read both as W and as Wᵀ: not one linear map
        if key not in sites:
            path, module_type = _site_path(key, _module_stack_entry(node))
            out_f, in_f = (weight.shape[1], weight.shape[0]) if match.stored_in_out else tuple(weight.shape)
            sites[key] = Site(path, key, module_type, int(in_f), int(out_f), match.stored_in_out, weight.dtype,
                              form=match.form.name)
        sites[key].calls.append(node)
    return _dedupe_paths(list(sites.values())) + find_expert_sites(gm)


def is_parameter(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _dedupe_paths(sites: list[Site]) -> list[Site]:
    """Two weights can share a module path (a module with two F.linear weights); then name
    each by its weight instead."""
    counts: dict[str, int] = {}
    for site in sites:
        counts[site.path] = counts.get(site.path, 0) + 1
    for site in sites:
        if counts[site.path] > 1:
            site.path = site.weight_name
    return sites


# ---------------------------------------------------------------- expert weights (3-D)
# An MoE stores its experts as one E x out x in (or E x in x out) parameter. Each expert's
# slice is a site ``<experts module>.<e>.<param>`` (so "gate_up_proj" selects every expert,
# "experts.3.gate_up_proj" one); its adapter acts on the weight, not on a call (see
# passes/insert_experts.py). The layout is read from how the graph consumes the parameter:
# views it may pass through (op -> flips the two last dims?) and consumers (op, arg) -> whether
# that argument is in x out.
EXPERT_VIEWS: dict[object, Callable[[fx.Node], bool | None]] = {
    aten.transpose.int: lambda n: True if sorted(d % 3 for d in n.args[1:3]) == [1, 2] else None,
    aten.index.Tensor: lambda n: False,          # gathers experts by id: S x out x in
    aten.select.int: lambda n: False if n.args[1] == 0 else None,
}
EXPERT_CONSUMERS: dict[tuple[object, int], bool] = {
    (aten.bmm.default, 0): False,                # bmm(W[ids], x.unsqueeze(-1)): W out x in
    (aten.bmm.default, 1): True,                 # bmm(x.unsqueeze(1), W[ids]): W in x out
    (aten.linear.default, 1): False,             # F.linear(x, W[e])
}


def _expert_consumers() -> dict[tuple[object, int], bool]:
    table = dict(EXPERT_CONSUMERS)
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        table[(fallback.default, 1)] = True      # grouped_mm_fallback(x, W: E x in x out, offs)
    return table


def _expert_layout(node: fx.Node, consumers, flipped: bool = False) -> bool | None:
    """Whether the parameter behind ``node`` is stored E x in x out (None: no known consumer)."""
    for user in node.users:
        if user.op != "call_function":
            continue
        view = EXPERT_VIEWS.get(user.target)
        if view is not None and user.args[0] is node:
            flips = view(user)
            if flips is not None:
                found = _expert_layout(user, consumers, flipped ^ flips)
                if found is not None:
                    return found
            continue
        for index, arg in enumerate(user.args):
            if arg is node and (user.target, index) in consumers:
                return consumers[(user.target, index)] ^ flipped
    return None


def find_expert_sites(gm: fx.GraphModule) -> list[Site]:
    consumers = _expert_consumers()
    sites: list[Site] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in seen or not is_parameter(gm, node.target):
            continue
        weight = gm.get_parameter(node.target)
        if weight.dim() != 3:
            continue
        stored_in_out = _expert_layout(node, consumers)
        if stored_in_out is None:
            continue
        seen.add(node.target)
        owner, _, short = node.target.rpartition(".")
        stack = next((_module_stack_entry(u) for u in node.users if _module_stack_entry(u)), None)
        module_type = stack[1] if stack is not None and stack[0] == owner else ""
        num, d1, d2 = (int(s) for s in weight.shape)
        out_f, in_f = (d2, d1) if stored_in_out else (d1, d2)
        for expert in range(num):
            path = f"{owner}.{expert}.{short}" if owner else f"{expert}.{short}"
            sites.append(Site(path, node.target, module_type, in_f, out_f, stored_in_out, weight.dtype,
                              form="expert", expert=expert))
    return sites


# ---------------------------------------------------------------- what rules can select
@dataclass
class Captured:
    """A captured model and what rules can select in it."""
    module: nn.Module                 # an fx.GraphModule, or a PartlyCaptured wrapper
    sites: list[Site]
    modules: dict[str, str]           # module path -> class name ("" if unknown), for full/type keys
    example_inputs: tuple[tuple, dict]
    partial_reason: str | None = None  # why the whole model did not export (captured in parts)
    parts: list = field(default_factory=list)
    # site path -> its weight's name in the adapted model, as the record names it (in parts the
    # wrapper's name: rosafx/pipeline/partial.py fills it)
    weight_names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.weight_names:
            self.weight_names = {s.path: s.weight_name for s in self.sites}

    @property
    def graph(self) -> nn.Module | None:
        """The one captured graph, or None when the model was captured in parts."""
        return self.module if self.partial_reason is None else None


def module_types(gm: fx.GraphModule) -> dict[str, str]:
    """Every module path that holds a parameter -> its class name as the trace recorded it."""
    types: dict[str, str] = {}
    for node in gm.graph.nodes:
        for path, module_type in (node.meta.get("nn_module_stack") or {}).values():
            path = re.sub(r"@\d+", "", path)  # a module called twice is recorded as "name@1"
            types.setdefault(path, module_type if isinstance(module_type, str)
                             else f"{module_type.__module__}.{module_type.__qualname__}")
    paths = set()
    for name, _ in gm.named_parameters(remove_duplicate=False):
        parts = name.split(".")[:-1]
        paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {p: types.get(p, "") for p in sorted(paths)}
