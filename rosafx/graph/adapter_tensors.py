"""The adapter tensors of an adapted graph, by the names rosafx's adapter file uses:
``rosafx_adapters.<site key>.<tensor>``, ``rosafx_shared.<tensor>`` and ``full.<module>.<tensor>``.
``install_tensors`` checks every name and shape, and that no tensor of a module trained in
full is missing, before it copies anything."""
from __future__ import annotations

import torch
from torch import fx

from rosafx.graph.adapted_graph import (ADAPTERS, SHARED, adapter_tensor_name, adapters_of, plan_of, set_base_weight,
                                        site_for_key)
from rosafx.errors import RosafxError
from rosafx.graph.sites import is_parameter

__all__ = ["adapter_tensors", "install_tensors"]


def adapter_tensors(adapted: fx.GraphModule) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path, adapter in adapters_of(adapted).items():
        for name, value in adapter.adapter_state().items():
            tensors[adapter_tensor_name(path, name)] = value
    if hasattr(adapted, SHARED):
        for name, value in getattr(adapted, SHARED).state_dict().items():
            tensors[f"{SHARED}.{name}"] = value
    for path in plan_of(adapted).full:
        for name, value in adapted.get_submodule(path).state_dict().items():
            tensors[f"full.{path}.{name}"] = value
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def install_tensors(adapted: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    adapters = adapters_of(adapted)
    per_adapter: dict[str, dict[str, torch.Tensor]] = {}
    shared, full = {}, {}
    unknown = set()
    for name, value in tensors.items():
        if name.startswith(ADAPTERS + "."):
            key, _, tensor_name = name[len(ADAPTERS) + 1:].partition(".")
            path = site_for_key(adapted, key)
            if path is None:
                unknown.add(key)
            else:
                per_adapter.setdefault(path, {})[tensor_name] = value
        elif name.startswith(SHARED + "."):
            shared[name[len(SHARED) + 1:]] = value
        elif name.startswith("full."):
            full[name[len("full."):]] = value
    if unknown or set(per_adapter) != set(adapters):
        raise RosafxError(f"Saved adapters {sorted(unknown | (set(per_adapter) ^ set(adapters)))} do not match "
                          "the sites.")
    _check_shapes(adapted, adapters, per_adapter, shared)
    _check_full_complete(adapted, full)
    if shared:
        getattr(adapted, SHARED).load_state_dict(shared)
    for path, state in per_adapter.items():
        if "base_weight" in state:
            set_base_weight(adapted, path, state["base_weight"])
        adapters[path].load_adapter_state(state)
    with torch.no_grad():
        for name, value in full.items():
            _check_full_tensor(adapted, name, value)
            adapted.get_parameter(name).copy_(value) if is_parameter(adapted, name) else adapted.get_buffer(name).copy_(value)


def _check_shapes(adapted: fx.GraphModule, adapters: dict, per_adapter: dict, shared: dict) -> None:
    """Every saved tensor has the name and shape the rebuilt adapter expects: a mismatch is
    a damaged or foreign file, said before anything is copied."""
    for path, state in per_adapter.items():
        adapter = adapters[path]
        expected = {n: tuple(v.shape) for n, v in adapter.adapter_state().items()}
        expected["base_weight"] = (adapter.out_features, adapter.in_features)
        for name, value in state.items():
            if name not in expected:
                raise RosafxError(f"Saved tensor '{path}.{name}' is not a tensor of the {adapter.config.method} "
                                  f"adapter on '{path}' (it has {sorted(expected)}).")
            if 0 in expected[name] and value.dim() == len(expected[name]):
                continue  # data-dependent size (rosa-robust's mask): the adapter validates it on load
            if tuple(value.shape) != expected[name]:
                raise RosafxError(f"Saved tensor '{path}.{name}' has shape {tuple(value.shape)}, but the adapter on "
                                  f"'{path}' needs {expected[name]}: the file does not match "
                                  "this model or its rosafx.json.")
    if shared:
        expected = {n: tuple(v.shape) for n, v in getattr(adapted, SHARED).state_dict().items()}
        for name, value in shared.items():
            if expected.get(name) != tuple(value.shape):
                raise RosafxError(f"Saved shared tensor '{name}' has shape {tuple(value.shape)}, expected "
                                  f"{expected.get(name)}.")


def _check_full_complete(adapted: fx.GraphModule, full: dict) -> None:
    """Every tensor of every module trained in full is saved: one left out would stay as the
    fresh model has it (a new task head: random), and the model would load without a word."""
    missing = [f"full.{path}.{name}" for path in plan_of(adapted).full
               for name in adapted.get_submodule(path).state_dict() if f"{path}.{name}" not in full]
    if missing:
        raise RosafxError(f"The saved tensors lack {missing[:4]}{' ...' if len(missing) > 4 else ''} of the "
                          f"module(s) trained in full ({', '.join(plan_of(adapted).full)}): the file is incomplete "
                          "or damaged, and loading it would leave them untrained. Use a complete adapter or "
                          "checkpoint (re-save it, or train again).")


def _check_full_tensor(adapted: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    try:
        target = adapted.get_parameter(name) if is_parameter(adapted, name) else adapted.get_buffer(name)
    except AttributeError:
        raise RosafxError(f"Saved tensor 'full.{name}' names no parameter or buffer of the model.") from None
    if target.shape != value.shape:
        raise RosafxError(f"Saved tensor 'full.{name}' has shape {tuple(value.shape)}, the model's has "
                          f"{tuple(target.shape)}.")
