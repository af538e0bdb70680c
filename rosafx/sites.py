"""Sites: every weight that the graph applies as a linear map.

A site is keyed by its weight (a ``get_attr`` target). Recognised forms (a table, not
branches):

    aten.linear(x, W, b?)            nn.Linear, F.linear on any parameter   W: out x in
    aten.addmm(b, x, W)              GPT-2 Conv1D                           W: in x out

A module called twice yields one site with two call nodes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn

aten = torch.ops.aten


@dataclass(frozen=True)
class SiteForm:
    """Where x, W and b sit in a call's arguments, and whether W is stored transposed."""
    target: object
    x: int
    weight: int
    bias: int | None
    transposed: bool


SITE_FORMS = [
    SiteForm(aten.linear.default, x=0, weight=1, bias=2, transposed=False),
    SiteForm(aten.addmm.default, x=1, weight=2, bias=0, transposed=True),
]
FORM_BY_TARGET = {form.target: form for form in SITE_FORMS}


@dataclass
class Site:
    path: str                 # module path the rules match against, e.g. "encoder.layer.0.attention.self.query"
    weight_name: str          # get_attr target of W
    module_type: str          # qualified class name of the owning module ("" if unknown)
    in_features: int
    out_features: int
    transposed: bool          # True when W is stored in x out (Conv1D)
    dtype: torch.dtype
    calls: list[fx.Node] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


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


def site_call_form(node: fx.Node) -> SiteForm | None:
    if node.op != "call_function":
        return None
    form = FORM_BY_TARGET.get(node.target)
    if form is None or len(node.args) <= form.weight:
        return None
    weight = node.args[form.weight]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    if form.target is aten.addmm.default and (len(node.args) > 3 or node.kwargs):
        return None  # addmm with beta/alpha is not a plain linear map
    return form


def find_sites(gm: fx.GraphModule) -> list[Site]:
    sites: dict[str, Site] = {}
    for node in gm.graph.nodes:
        form = site_call_form(node)
        if form is None:
            continue
        weight_node = node.args[form.weight]
        weight = gm.get_parameter(weight_node.target) if is_parameter(gm, weight_node.target) else None
        if weight is None or weight.dim() != 2:
            continue
        key = weight_node.target
        if key not in sites:
            path, module_type = _site_path(key, _module_stack_entry(node))
            out_f, in_f = (weight.shape[1], weight.shape[0]) if form.transposed else tuple(weight.shape)
            sites[key] = Site(path, key, module_type, int(in_f), int(out_f), form.transposed, weight.dtype)
        sites[key].calls.append(node)
    return _dedupe_paths(list(sites.values()))


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
