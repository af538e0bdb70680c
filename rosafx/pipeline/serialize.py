"""Save and load adapters: ``adapter.safetensors`` + ``rosafx.json``.

The JSON holds the plan (each site's method config, the modules trained in full), each
site's weight name, and a fingerprint of the base weights the adapters were built on;
loading onto other base weights is refused. ``load`` is capture -> sites ->
``Plan.from_dict`` -> apply -> install tensors: one capture, and the rules language is not
involved. A directory with ``adapter_config.json`` is an HF PEFT adapter and goes through
``rosafx.pipeline.peft_format``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import fx, nn

from rosafx.graph.adapted_graph import record
from rosafx.graph.adapter_tensors import adapter_tensors, install_tensors
from rosafx.io.atomic import atomic_directory, recover
from rosafx.errors import RosafxError
from rosafx.io.reading import read_json, read_safetensors
from rosafx.io.outputs import check_output
from rosafx.pipeline.peft_format import load_peft, save_peft
from rosafx.graph.plan import Plan
from rosafx.ops.quantized import Quantization
from rosafx.passes.bank import bank_whole
from rosafx.pipeline.transform import apply, capture_sites

FORMAT_VERSION = 1
JSON_NAME, TENSORS_NAME = "rosafx.json", "adapter.safetensors"


def save(adapted: fx.GraphModule, directory, *, format: str = "rosafx") -> None:
    if format == "peft":
        save_peft(adapted, directory)
        return
    if format != "rosafx":
        raise RosafxError(f"Unknown save format '{format}': use 'rosafx' or 'peft'.")
    check_output(directory)
    with atomic_directory(directory) as tmp:
        write_adapter(adapted, tmp)


def write_adapter(adapted: fx.GraphModule, directory: Path) -> None:
    """Write the adapter files into an existing directory (callers make it atomic)."""
    info = record(adapted)
    plan = info["plan"].to_dict()
    saved = {
        "format": "rosafx", "version": FORMAT_VERSION, "full": plan["full"], "fingerprint": info["fingerprint"],
        "sites": {p: {"config": c, "weight_name": info["sites"][p]["weight_name"]} for p, c in plan["sites"].items()},
    }
    if info.get("quantize") is not None:  # load rebuilds the same quantized base
        saved["quantize"] = info["quantize"].to_dict()
    save_file(_unshare(adapter_tensors(adapted)), str(Path(directory) / TENSORS_NAME))
    (Path(directory) / JSON_NAME).write_text(json.dumps(saved, indent=2, sort_keys=True, allow_nan=False))


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
    """The record's shape, before any of it reaches apply (which allocates)."""
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
    elif record.get("quantize") is not None:
        try:
            Quantization.parse(record["quantize"])
        except RosafxError as exc:
            bad = f"'quantize': {exc}"
    if bad:
        raise RosafxError(f"{path} is not a valid rosafx adapter record: {bad}. Re-save the adapter.")


def load(model: nn.Module, directory, *, example_inputs=None, quantize=None) -> fx.GraphModule:
    """``quantize``: the base's quantization; None takes the one the adapter was saved with
    (a rosafx record names it; an HF PEFT directory does not: say it for a QLoRA adapter)."""
    directory = Path(directory)
    recover(directory)  # a save killed mid-swap: put the old directory back
    quantization = Quantization.parse(quantize)
    if (directory / "adapter_config.json").exists() and not (directory / JSON_NAME).exists():
        return load_peft(model, directory, example_inputs=example_inputs, quantize=quantization)
    saved = read_record(directory)
    if quantization is None:
        quantization = Quantization.parse(saved.get("quantize"))
    captured = capture_sites(model, example_inputs)
    _check_same_sites(saved, captured, directory)
    plan = Plan.from_dict({"sites": {p: site["config"] for p, site in saved["sites"].items()}, "full": saved["full"]})
    adapted = apply(captured, plan, quantization, bank=False)
    if record(adapted)["fingerprint"] != saved["fingerprint"]:  # of the user's weights, before quantizing
        raise RosafxError(f"The adapter in {directory} was built on other base weights than this model's "
                          "(fingerprint mismatch). Load it onto the model it was trained from.")
    install_tensors(adapted, read_safetensors(directory / TENSORS_NAME, "the adapter tensors"))
    return bank_whole(adapted)  # as transform returns it (stacked after the values are in)


def _check_same_sites(saved: dict, captured, directory: Path) -> None:
    """Every site and module the record names exists in this model, on the same weight."""
    weights = captured.weight_names
    missing = sorted(set(saved["sites"]) - set(weights)) + sorted(set(saved["full"]) - set(captured.modules))
    if missing:
        raise RosafxError(f"The adapter in {directory} names {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                          "which this model lacks. Load it onto the model it was trained from.")
    moved = sorted(p for p, s in saved["sites"].items() if weights[p] != s["weight_name"])
    if moved:
        raise RosafxError(f"The adapter in {directory} expects other weights at {moved[:4]}: it was built on "
                          "another model.")
