"""The method registry: one line per method. ``full`` is handled by the transform itself."""
from __future__ import annotations

import dataclasses

from rosafx.errors import RosafxError
from rosafx.methods.base import Adapter, Method, MethodConfig
from rosafx.methods.lora import Lora
from rosafx.methods.lora_ga import LoraGa
from rosafx.methods.rosa import Rosa
from rosafx.methods.rosa_robust import RosaRobust
from rosafx.methods.vera import Vera

REGISTRY: dict[str, Method] = {m.id: m for m in (
    Lora(),
    LoraGa(),
    Rosa(),
    RosaRobust(),
    Vera(),
)}

FULL = "full"  # HF PEFT's modules_to_save: the whole module trains as is


def get_method(method_id: str) -> Method:
    if method_id not in REGISTRY:
        raise RosafxError(f"Unknown method '{method_id}'. Known methods: {sorted(REGISTRY) + [FULL]}.")
    return REGISTRY[method_id]


def methods_that(capability: str) -> list[str]:
    """Ids of the registered methods with ``capability`` set (e.g. ``adapts_expert_weights``)."""
    return sorted(m.id for m in REGISTRY.values() if getattr(m, capability))


def methods_with_option(name: str) -> list[str]:
    """Ids of the registered methods whose config has the option ``name`` (e.g. ``alpha``)."""
    return sorted(m.id for m in REGISTRY.values() if name in {f.name for f in dataclasses.fields(m.Config)})


def parse_config(raw) -> MethodConfig | str:
    """A rule value -> a method config object (or FULL)."""
    if isinstance(raw, MethodConfig):
        raw.validate()
        return raw
    if isinstance(raw, str):
        raw = {"method": raw}
    if not isinstance(raw, dict) or "method" not in raw:
        raise RosafxError(f"A rule config must be a dict with a 'method' key, e.g. "
                          f"{{'method': 'lora', 'rank': 8}}; got {raw!r}.")
    if not isinstance(raw["method"], str):
        raise RosafxError(f"A rule's 'method' must be a method id such as 'lora', got {raw['method']!r}.")
    if raw["method"] == FULL:
        if len(raw) > 1:
            raise RosafxError("The 'full' method takes no options.")
        return FULL
    return get_method(raw["method"]).Config.from_dict(raw)


__all__ = ["REGISTRY", "FULL", "get_method", "methods_that", "methods_with_option", "parse_config", "Adapter", "Method", "MethodConfig"]
