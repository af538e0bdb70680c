"""Hostile inputs for the fault-matrix tests: archives and files that would run code (each
payload creates a marker file), built from a real ``torch.export.save`` archive by editing
its entries, as an attacker would."""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import torch


class Marker:
    """Unpickling this calls ``open(path, 'w')``: the marker file appearing means code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_payload(marker) -> bytes:
    return pickle.dumps(Marker(marker))


def torch_pickle_payload(marker) -> bytes:
    """A payload in torch.save's zip format, which torch.load(weights_only=False) runs."""
    buffer = io.BytesIO()
    torch.save(Marker(marker), buffer)
    return buffer.getvalue()


def code(marker) -> str:
    """A Python expression that creates the marker."""
    return f"__import__('builtins').open({str(marker)!r}, 'w')"


def rewrite(src, dst, edit) -> Path:
    """Copy the archive ``src`` to ``dst``; ``edit(name, data) -> bytes | None`` changes an
    entry (None drops it); ``edit.extra`` (optional dict name -> bytes) adds entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/")[0] + "/"
        for info in zin.infolist():
            data = edit(info.filename[len(prefix):], zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in getattr(edit, "extra", {}).items():
            zout.writestr(prefix + name, data)
    return Path(dst)


def edit_json(name_wanted, change):
    def edit(name, data):
        if name != name_wanted:
            return data
        value = json.loads(data)
        change(value)
        return json.dumps(value).encode()
    return edit


def pickled_weight(src, dst, marker) -> Path:
    """The first weight marked use_pickle, its file a payload (torch.export.load unpickles it)."""
    config_name = "data/weights/model_weights_config.json"
    first = {}

    def mark(value):
        fqn = next(iter(value["config"]))
        value["config"][fqn]["use_pickle"] = True
        first["file"] = "data/weights/" + value["config"][fqn]["path_name"]
    config = zipfile.ZipFile(src).read(_full(src, config_name))
    mark_value = json.loads(config)
    mark(mark_value)

    def edit(name, data):
        if name == config_name:
            return json.dumps(mark_value).encode()
        if name == first["file"]:
            return torch_pickle_payload(marker)
        return data
    return rewrite(src, dst, edit)


def opaque_constant(src, dst, marker) -> Path:
    """An opaque object constant: torch.export.load pickle.loads it."""
    config_name = "data/constants/model_constants_config.json"

    def add(value):
        value["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                   "tensor_meta": None}
    edit = edit_json(config_name, add)
    edit.extra = {"data/constants/opaque_obj_0": pickle_payload(marker)}
    return rewrite(src, dst, edit)


def pickled_sample_inputs(src, dst, marker) -> Path:
    """Sample inputs that fail the weights-only unpickler (torch then falls back to full unpickling)."""
    def edit(name, data):
        return torch_pickle_payload(marker) if name == "data/sample_inputs/model.pt" else data
    return rewrite(src, dst, edit)


def model_json(src, dst, change) -> Path:
    return rewrite(src, dst, edit_json("models/model.json", change))


def _full(src, name) -> str:
    names = zipfile.ZipFile(src).namelist()
    return next(n for n in names if n.endswith("/" + name))
