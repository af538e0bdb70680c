"""Save and load adapters: ``adapter.safetensors`` + ``rosafx.json``.

The JSON holds each site's method config and weight name, the modules trained in full,
and a fingerprint of the base weights the adapters were built on; loading onto other
base weights is refused. A directory with ``adapter_config.json`` is an HF PEFT adapter
and goes through ``rosafx.peft_format``.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import fx, nn

from rosafx.passes.insert import ADAPTERS, adapters_of, set_base_weight

from .atomic import atomic_directory, recover
from .errors import RosafxError
from .files import read_json, read_safetensors
from .outputs import check_output
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
    check_output(directory)
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
    (Path(directory) / JSON_NAME).write_text(json.dumps(record, indent=2, sort_keys=True, allow_nan=False))


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; saved values are copies anyway."""
    return {k: v.clone() for k, v in tensors.items()}


def read_record(directory) -> dict:
    directory = Path(directory)
    path = directory / JSON_NAME
    if not path.exists():
        raise RosafxError(f"{directory} is not a rosafx adapter directory (no {JSON_NAME}); "
                          "an HF PEFT directory has adapter_config.json.")
    record = read_json(path, "the adapter record")
    version = record.get("version")
    if record.get("format") != "rosafx" or not isinstance(version, int) or isinstance(version, bool) \
            or not 1 <= version <= FORMAT_VERSION:
        raise RosafxError(f"{path} has format {record.get('format')!r} version {version!r}; this rosafx reads "
                          f"rosafx versions 1 to {FORMAT_VERSION}. Re-save the adapter with this rosafx.")
    _check_record(record, path)
    return record


def _check_record(record: dict, path: Path) -> None:
    """The record's shape, before any of it reaches transform (which allocates)."""
    sites, full = record.get("sites"), record.get("full")
    bad = None
    if not isinstance(sites, dict):
        bad = "'sites' must be an object"
    elif not all(isinstance(p, str) and isinstance(s, dict) and isinstance(s.get("config"), dict)
                 and isinstance(s.get("weight_name"), str) for p, s in sites.items()):
        bad = "each site must be {'config': {...}, 'weight_name': '...'}"
    elif not isinstance(full, list) or not all(isinstance(p, str) for p in full):
        bad = "'full' must be a list of module paths"
    elif not isinstance(record.get("fingerprint"), str):
        bad = "'fingerprint' must be a string"
    elif not sites and not full:
        bad = "it names no site and no module"
    if bad:
        raise RosafxError(f"{path} is not a valid rosafx adapter record: {bad}. Re-save the adapter.")


def load(model: nn.Module, directory, *, example_inputs=None) -> fx.GraphModule:
    directory = Path(directory)
    recover(directory)  # a save killed mid-swap: put the old directory back
    if (directory / "adapter_config.json").exists() and not (directory / JSON_NAME).exists():
        from .peft_format import load_peft
        return load_peft(model, directory, example_inputs=example_inputs)
    record = read_record(directory)
    rules: dict = {exact_path_rule(p): site["config"] for p, site in record["sites"].items()}
    rules.update({exact_path_rule(p): {"method": "full"} for p in record["full"]})
    with warnings.catch_warnings():  # a missing site is an error below, not a warning
        warnings.simplefilter("ignore")
        adapted = transform(model, rules, example_inputs=example_inputs)
    _check_same_sites(record, adapted.meta["rosafx"], directory)
    weight_names = [site["weight_name"] for site in record["sites"].values()]
    if fingerprint(adapted, weight_names) != record["fingerprint"]:
        raise RosafxError(f"The adapter in {directory} was built on other base weights than this model's "
                          "(fingerprint mismatch). Load it onto the model it was trained from.")
    install_tensors(adapted, read_safetensors(directory / TENSORS_NAME, "the adapter tensors"))
    return adapted


def _check_same_sites(record: dict, built: dict, directory: Path) -> None:
    """Every site and module the record names exists in this model, on the same weight."""
    missing = sorted(set(record["sites"]) - set(built["sites"])) + sorted(set(record["full"]) - set(built["full"]))
    if missing:
        raise RosafxError(f"The adapter in {directory} names {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                          "which this model lacks. Load it onto the model it was trained from.")
    moved = sorted(p for p, s in record["sites"].items() if built["sites"][p]["weight_name"] != s["weight_name"])
    if moved:
        raise RosafxError(f"The adapter in {directory} expects other weights at {moved[:4]}: it was built on "
                          "another model.")


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
    _check_shapes(adapted, adapters, per_adapter, shared)
    if shared:
        getattr(adapted, SHARED).load_state_dict(shared)
    for key, state in per_adapter.items():
        if "base_weight" in state:
            set_base_weight(adapted, key, state["base_weight"])
        adapters[key].load_adapter_state(state)
    with torch.no_grad():
        for name, value in full.items():
            _check_full_tensor(adapted, name, value)
            adapted.get_parameter(name).copy_(value) if is_parameter(adapted, name) else adapted.get_buffer(name).copy_(value)


def _check_shapes(adapted: fx.GraphModule, adapters: dict, per_adapter: dict, shared: dict) -> None:
    """Every saved tensor has the name and shape the rebuilt adapter expects: a mismatch is
    a damaged or foreign file, said before anything is copied."""
    for key, state in per_adapter.items():
        adapter = adapters[key]
        expected = {n: tuple(v.shape) for n, v in adapter.adapter_state().items()}
        expected["base_weight"] = (adapter.out_features, adapter.in_features)
        for name, value in state.items():
            if name not in expected:
                raise RosafxError(f"Saved tensor '{key}.{name}' is not a tensor of the {adapters[key].config.method} "
                                  f"adapter on '{adapters[key].site_path}' (it has {sorted(expected)}).")
            if 0 in expected[name] and value.dim() == len(expected[name]):
                continue  # data-dependent size (rosa-robust's mask): the adapter validates it on load
            if tuple(value.shape) != expected[name]:
                raise RosafxError(f"Saved tensor '{key}.{name}' has shape {tuple(value.shape)}, but the adapter on "
                                  f"'{adapters[key].site_path}' needs {expected[name]}: the file does not match "
                                  "this model or its rosafx.json.")
    if shared:
        expected = {n: tuple(v.shape) for n, v in getattr(adapted, SHARED).state_dict().items()}
        for name, value in shared.items():
            if expected.get(name) != tuple(value.shape):
                raise RosafxError(f"Saved shared tensor '{name}' has shape {tuple(value.shape)}, expected "
                                  f"{expected.get(name)}.")


def _check_full_tensor(adapted: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    try:
        target = adapted.get_parameter(name) if is_parameter(adapted, name) else adapted.get_buffer(name)
    except AttributeError:
        raise RosafxError(f"Saved tensor 'full.{name}' names no parameter or buffer of the model.") from None
    if target.shape != value.shape:
        raise RosafxError(f"Saved tensor 'full.{name}' has shape {tuple(value.shape)}, the model's has "
                          f"{tuple(target.shape)}.")
