"""Graph-break fallback: when the whole model does not export, capture the parts that do.

``torch.export`` needs one trace of the whole forward; a data-dependent branch anywhere
(Mixtral's eager experts loop over ``nonzero`` results) makes it fail for the whole model,
while every attention and most MLPs around it would trace. Like a compiler's graph break,
``capture_partly`` then walks the module tree from the root:

* a module with no weight of 2 or more dims is left as Python (nothing to adapt there);
* a module the model called is exported with the inputs it got on one eager run (recorded
  by forward hooks); if that works it becomes a *part*: a plain, trainable
  ``fx.GraphModule`` put in the module's place;
* otherwise the reason is recorded and its children are tried in turn.

The result, ``PartlyCaptured``, holds a copy of the model (parameters share storage with
the user's, as new frozen ``Parameter`` objects) whose captured modules are graphs and
whose untraceable control flow runs as Python around them. A part called later with other
non-tensor arguments (no mask once a batch has no padding) is traced again for them,
sharing the same adapters. Every pass sees a plain
``fx.GraphModule`` per part: ``transform`` finds sites in each (paths are the model's own,
so rules read the same), inserts adapters per part, and gathers them in one
``rosafx_adapters`` dict on the wrapper; ``merge`` merges every part and puts the merged
weights back into the eager modules: the result is the user's kind of model, plain
weights, no graphs (it generates with its KV cache);
save/load and HF PEFT read and write the same files as for a whole graph. ONNX export needs
one graph and is refused. ``parts`` (path -> "graph") and ``python`` (path -> why not) say
what happened; ``rosafx inspect`` prints them.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from rosafx.passes.dropout import dropout_follows_mode
from rosafx.passes.insert import insert_adapters, insert_planned
from rosafx.passes.merge import merge_adapters

from rosafx.graph.adapted_graph import ADAPTERS, META, adapters_of, fingerprint, make_record
from rosafx.graph.capture import _UseCacheOff, _rebind_parameters, normalize_example_inputs
from rosafx.errors import RosafxError
from rosafx.methods import get_method, methods_that
from rosafx.graph.sites import Captured, find_sites


class PartlyCaptured(nn.Module):
    """The user's model with its exportable submodules replaced by graphs."""

    def __init__(self, model: nn.Module, parts: list[str], python: dict[str, str]):
        super().__init__()
        self.model = model
        self.part_paths = list(parts)
        self.python = dict(python)
        self.meta: dict[str, Any] = {}

    def forward(self, *args, **kwargs):
        with _UseCacheOff(self.model):
            return self.model(*args, **kwargs)

    def parts(self) -> dict[str, fx.GraphModule]:
        return {path: self.model.get_submodule(path).graph for path in self.part_paths}


class _Flat(nn.Module):
    """``module`` called with only the tensors of one recorded call; the rest are constants."""

    def __init__(self, module: nn.Module, spec, constants: list):
        super().__init__()
        self.module, self.spec, self.constants = module, spec, constants

    def forward(self, *tensors):
        leaves = list(self.constants)
        tensor_iter = iter(tensors)
        leaves = [next(tensor_iter) if leaf is _TENSOR else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.module(*args, **kwargs)


_TENSOR = object()


def _split(args: tuple, kwargs: dict):
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    constants = [_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)], spec, constants


class CapturedPart(nn.Module):
    """Stands where a captured submodule stood: takes its call's arguments and hands the
    tensors to ``graph`` (an ``fx.GraphModule``). The other arguments (flags, None where a
    tensor may be) were constants of the trace. A call that changes them (HF passes no mask
    once a batch has no padding) gets a trace of its own from the eager module, with the
    same adapter objects inserted, so every variant trains and saves as one."""

    def __init__(self, path: str, graph: fx.GraphModule, spec, constants: list, eager: nn.Module):
        super().__init__()
        self.path, self.graph, self.spec, self.constants = path, graph, spec, constants
        self.variants = nn.ModuleList()
        self.variant_keys: list = []
        object.__setattr__(self, "eager", eager)  # not a submodule: its weights are the graph's

    def forward(self, *args, **kwargs):
        tensors, spec, constants = _split(args, kwargs)
        if spec == self.spec and constants == self.constants:
            return self.graph(*tensors)
        for (v_spec, v_constants), graph in zip(self.variant_keys, self.variants):
            if spec == v_spec and constants == v_constants:
                return graph(*tensors)
        graph = self._trace_variant(args, kwargs)
        self.variant_keys.append((spec, constants))
        self.variants.append(graph)
        return graph(*tensors)

    def _trace_variant(self, args, kwargs) -> fx.GraphModule:
        try:
            graph = _export_part(self.path, self.eager, args, kwargs).graph
        except Exception as exc:
            raise RosafxError(f"Captured part '{self.path}' was called with other non-tensor arguments than "
                              f"when captured and does not export that way ({_first_line(exc)}).") from exc
        dropout_follows_mode(graph)
        adapters = adapters_of(self.graph)
        sites = [s for s in _prefixed_sites(self.path, graph) if s.path in adapters]
        if sites:
            insert_adapters(graph, sites, [adapters[s.path] for s in sites])
            graph.meta[META] = self.graph.meta.get(META)
        graph.train(self.training)
        return graph


def _copy_sharing_storage(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters are new frozen Parameters on the user's storage."""
    memo = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(param.detach(), requires_grad=False)
    return copy.deepcopy(model, memo)


def _has_weights(module: nn.Module) -> bool:
    """Worth capturing: a weight of 2+ dims that is not only an embedding table."""
    if isinstance(module, nn.Embedding):
        return False
    return any(p.dim() >= 2 for p in module.parameters())


def _record_calls(model: nn.Module, args: tuple, kwargs: dict) -> dict[int, tuple[tuple, dict]]:
    """The first (args, kwargs) each submodule was called with on one eager run."""
    calls: dict[int, tuple[tuple, dict]] = {}

    def hook(module, module_args, module_kwargs):
        calls.setdefault(id(module), (module_args, module_kwargs))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        with _UseCacheOff(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _all_dims_auto(value):
    """Every dim may vary; export keeps static what the module fixes (a weight's in_features)."""
    if isinstance(value, torch.Tensor):
        return {d: Dim.AUTO for d in range(value.dim())} if value.dim() else None
    if isinstance(value, (list, tuple)):
        return type(value)(_all_dims_auto(v) for v in value)
    if isinstance(value, dict):
        return {k: _all_dims_auto(v) for k, v in value.items()}
    return None


def _export_part(path: str, module: nn.Module, args: tuple, kwargs: dict) -> CapturedPart:
    tensors, spec, constants = _split(args, kwargs)
    flat = _Flat(module, spec, constants)
    with torch.no_grad():
        program = torch.export.export(flat, tuple(tensors), strict=False,
                                      dynamic_shapes=(tuple(_all_dims_auto(t) for t in tensors),))
    unlifted = program.module()
    gm = fx.GraphModule(unlifted, copy.deepcopy(unlifted.graph), class_name="RosafxPartModule")
    _rebind_parameters(gm)
    return CapturedPart(path, gm, spec, constants, module)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def capture_partly(model: nn.Module, example_inputs=None, *, root_reason: str = "") -> tuple[PartlyCaptured, tuple, dict]:
    args, kwargs = normalize_example_inputs(model, example_inputs)
    copied = _copy_sharing_storage(model)
    copied.eval()
    try:
        calls = _record_calls(copied, args, kwargs)
    except Exception as exc:  # the inputs are wrong, not the model's tracing
        raise RosafxError(f"{root_reason} -- nor does the model run eagerly on these example inputs "
                          f"({_first_line(exc)}). Check that example_inputs match the model's forward().") from exc
    parts: dict[str, fx.GraphModule] = {}
    python: dict[str, str] = {"": root_reason or "the whole model does not export"}

    def visit(path: str, module: nn.Module) -> None:
        if not _has_weights(module):
            return
        if path and id(module) in calls:
            module_args, module_kwargs = calls[id(module)]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    parts[path] = _export_part(path, module, module_args, module_kwargs)
                return
            except Exception as exc:  # torch.export raises many types; each is a reason to descend
                python[path] = _first_line(exc)
        elif path:
            python[path] = "not called as a module (a container)"
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", copied)
    for path, part in parts.items():
        owner, _, name = path.rpartition(".")
        parent = copied.get_submodule(owner) if owner else copied
        parent._modules[name] = part
    if not parts:
        raise RosafxError(f"torch.export could not capture {type(model).__name__} nor any of its submodules "
                          f"({root_reason}). Set ROSAFX_DEBUG=1 for the trace.")
    wrapper = PartlyCaptured(copied, sorted(parts), {p: r for p, r in python.items()
                                                     if not any(p == q or p.startswith(q + ".") for q in parts)})
    wrapper.train(model.training)
    return wrapper, args, kwargs


def part_sites(wrapper: PartlyCaptured):
    """(part path, its graph, its sites with model paths) for every part."""
    return [(path, gm, _prefixed_sites(path, gm)) for path, gm in wrapper.parts().items()]


def _prefixed_sites(path: str, gm: fx.GraphModule):
    sites = find_sites(gm)
    for site in sites:  # paths inside the graph start at _Flat's "module"
        inner = site.path[len("module"):].lstrip(".") if site.path.startswith("module") else site.path
        site.path = f"{path}.{inner}" if inner else path
    return sites


def capture_parts(model: nn.Module, example_inputs=None, *, reason: str = "") -> Captured:
    """The parts of ``model`` that export, their sites with model paths (rosafx/pipeline/transform.py's
    capture step when the whole model does not export)."""
    wrapper, args, kwargs = capture_partly(model, example_inputs, root_reason=reason)
    for gm in wrapper.parts().values():
        dropout_follows_mode(gm)
    per_part = part_sites(wrapper)
    modules = {path: f"{type(m).__module__}.{type(m).__qualname__}"
               for path, m in wrapper.model.named_modules() if path and _has_weights(m)}
    return Captured(wrapper, [s for _, _, sites in per_part for s in sites], modules, (args, kwargs),
                    partial_reason=reason, parts=per_part,
                    weight_names={s.path: _wrapper_name(path, s.weight_name) for path, _, sites in per_part
                                  for s in sites})


def _wrapper_name(part: str, name: str) -> str:
    """A part graph's weight as the wrapper (and so the record) names it."""
    return f"model.{part}.graph.{name}"


def apply_to_parts(captured: Captured, plan) -> PartlyCaptured:
    """Insert the plan's adapters into every part; one ``rosafx_adapters`` dict on the wrapper."""
    wrapper, reason = captured.module, captured.partial_reason
    if plan.full:
        raise RosafxError("'full' rules are not supported on a partly captured model (the whole model did not "
                          f"export: {reason}).")
    bad = sorted(m for m in plan.methods() if not get_method(m).adapts_partly_captured)
    if bad:
        raise RosafxError(f"This model exports only in parts ({reason}); rosafx adapts such a model with "
                          f"{methods_that('adapts_partly_captured')}, not {bad}.")
    plan.check(captured.sites, captured.modules)
    container = nn.ModuleDict()
    weights = {}
    for path, gm, sites in captured.parts:
        mine = {s.path: plan.sites[s.path] for s in sites if s.path in plan.sites}
        if not mine:
            continue
        insert_planned(gm, sites, mine)
        for key, adapter in getattr(gm, ADAPTERS).items():
            container[key] = adapter
        own = {s.path: (s.weight_name, s.stored_in_out) for s in sites if s.path in mine}
        gm.meta[META] = make_record(plan, own, ((), {}), "")
        weights.update({p: (captured.weight_names[p], t) for p, (_, t) in own.items()})
    wrapper.add_module(ADAPTERS, container)
    assert set(adapters_of(wrapper)) == set(plan.sites)
    wrapper.meta[META] = make_record(plan, weights, captured.example_inputs,
                                     fingerprint(wrapper, [w for w, _ in weights.values()]),
                                     parts={p: "graph" for p in wrapper.part_paths}, python=wrapper.python)
    return wrapper


def merge_partly(adapted: PartlyCaptured) -> nn.Module:
    """The user's kind of model, all Python again, with every part's merged weights: plain
    weights, no graphs, no adapters; it generates with its KV cache like any checkpoint."""
    parts = {path: adapted.model.get_submodule(path) for path in adapted.part_paths}
    memo = {id(part): None for part in parts.values()}
    memo.update({id(p): p for p in adapted.model.parameters()})
    model = copy.deepcopy(adapted.model, memo)  # the parts are put back below, as eager modules
    for path, part in parts.items():
        eager = copy.deepcopy(part.eager)
        if META in part.graph.meta:
            merged = merge_adapters(part.graph).state_dict()
            own = eager.state_dict()
            for name, value in merged.items():
                inner = name[len("module."):] if name.startswith("module.") else name
                if inner.endswith("_merged") or inner not in own:
                    raise RosafxError(f"Merged weight '{path}.{inner}' has no place in the eager module "
                                      "(a weight tied across modules); exclude that site from the rules.")
                own[inner] = value
            eager.load_state_dict(own)
        owner, _, name = path.rpartition(".")
        (model.get_submodule(owner) if owner else model)._modules[name] = eager
    model.train(adapted.training)
    return model
