"""Save and load adapters: ``adapter.safetensors`` + ``rosafx.json``.

The JSON holds each site's method config and weight name, the modules trained in full,
and a fingerprint of the base weights the adapters were built on; loading onto other
base weights is refused. A directory with ``adapter_config.json`` is an HF PEFT adapter
and goes through ``rosafx.peft_format``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import fx, nn

from rosafx.passes.insert import ADAPTERS, adapters_of, set_base_weight

from .atomic import atomic_directory
from .errors import RosafxError
from .sites import is_parameter
from .transform import fingerprint, transform

FORMAT_VERSION = 1
JSON_NAME, TENSORS_NAME = "rosafx.json", "adapter.safetensors"
SHARED = "rosafx_shared"  # state shared by several sites (VeRA's random pair)


def exact_path_rule(path: str) -> str:
    """A rule key that selects exactly ``path`` (a regex that is neither a suffix nor a path)."""
    return f"(?:{re.escape(path)})"


def adapter_tensors(adapted: fx.GraphModule) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for key, adapter in adapters_of(adapted).items():
        for name, value in adapter.adapter_state().items():
            tensors[f"{ADAPTERS}.{key}.{name}"] = value
    if hasattr(adapted, SHARED):
        for name, value in getattr(adapted, SHARED).state_dict().items():
            tensors[f"{SHARED}.{name}"] = value
    for path in adapted.meta["rosafx"]["full"]:
        for name, value in adapted.get_submodule(path).state_dict().items():
            tensors[f"full.{path}.{name}"] = value
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save(adapted: fx.GraphModule, directory, *, format: str = "rosafx") -> None:
    if format == "peft":
        from .peft_format import save_peft
        save_peft(adapted, directory)
        return
    if format != "rosafx":
        raise RosafxError(f"Unknown save format '{format}': use 'rosafx' or 'peft'.")
    with atomic_directory(directory) as tmp:
        write_adapter(adapted, tmp)


def write_adapter(adapted: fx.GraphModule, directory: Path) -> None:
    """Write the adapter files into an existing directory (callers make it atomic)."""
    meta = adapted.meta["rosafx"]
    record = {
        "format": "rosafx", "version": FORMAT_VERSION,
        "sites": meta["sites"], "full": meta["full"], "fingerprint": meta["fingerprint"],
    }
    save_file(_unshare(adapter_tensors(adapted)), str(Path(directory) / TENSORS_NAME))
    (Path(directory) / JSON_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; saved values are copies anyway."""
    return {k: v.clone() for k, v in tensors.items()}


def read_record(directory) -> dict:
    directory = Path(directory)
    path = directory / JSON_NAME
    if not path.exists():
        raise RosafxError(f"{directory} is not a rosafx adapter directory (no {JSON_NAME}); "
                          "an HF PEFT directory has adapter_config.json.")
    record = json.loads(path.read_text())
    if record.get("format") != "rosafx" or record.get("version", 0) > FORMAT_VERSION:
        raise RosafxError(f"{path} has format {record.get('format')} version {record.get('version')}; "
                          f"this rosafx reads rosafx version ≤ {FORMAT_VERSION}.")
    return record


def load(model: nn.Module, directory, *, example_inputs=None) -> fx.GraphModule:
    directory = Path(directory)
    if (directory / "adapter_config.json").exists() and not (directory / JSON_NAME).exists():
        from .peft_format import load_peft
        return load_peft(model, directory, example_inputs=example_inputs)
    record = read_record(directory)
    rules: dict = {exact_path_rule(p): site["config"] for p, site in record["sites"].items()}
    rules.update({exact_path_rule(p): {"method": "full"} for p in record["full"]})
    adapted = transform(model, rules, example_inputs=example_inputs)
    weight_names = [site["weight_name"] for site in record["sites"].values()]
    if fingerprint(adapted, weight_names) != record["fingerprint"]:
        raise RosafxError(f"The adapter in {directory} was built on other base weights than this model's "
                          "(fingerprint mismatch). Load it onto the model it was trained from.")
    install_tensors(adapted, load_file(str(directory / TENSORS_NAME)))
    return adapted


def install_tensors(adapted: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    adapters = adapters_of(adapted)
    per_adapter: dict[str, dict[str, torch.Tensor]] = {}
    shared, full = {}, {}
    for name, value in tensors.items():
        if name.startswith(ADAPTERS + "."):
            key, _, tensor_name = name[len(ADAPTERS) + 1:].partition(".")
            per_adapter.setdefault(key, {})[tensor_name] = value
        elif name.startswith(SHARED + "."):
            shared[name[len(SHARED) + 1:]] = value
        elif name.startswith("full."):
            full[name[len("full."):]] = value
    if set(per_adapter) != set(adapters):
        raise RosafxError(f"Saved adapters {sorted(set(per_adapter) ^ set(adapters))} do not match the sites.")
    if shared:
        getattr(adapted, SHARED).load_state_dict(shared)
    for key, state in per_adapter.items():
        if "base_weight" in state:
            set_base_weight(adapted, key, state["base_weight"])
        adapters[key].load_adapter_state(state)
    with torch.no_grad():
        for name, value in full.items():
            adapted.get_parameter(name).copy_(value) if is_parameter(adapted, name) else adapted.get_buffer(name).copy_(value)
