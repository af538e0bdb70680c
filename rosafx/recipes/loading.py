"""Open a model the user names on the command line: an HF directory, a ``.pt2`` from
``torch.export.save``, or a pickled ``.pt`` module (only on explicit trust)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rosafx.errors import RosafxError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")
SOURCE_KINDS = ("hf", "pt2", "pickle")


@dataclass
class ModelSource:
    path: str
    kind: str            # "hf" | "pt2" | "pickle"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


SOURCE_NAME = "source.json"


def read_source(adapter_dir) -> ModelSource:
    """The base model named by ``adapter_dir/source.json``. The file is untrusted input: its
    keys and kind are checked, and the kind must be what the path itself is (``identify``),
    so the file cannot widen what the user's flags allow (a pickle still needs --trust-pickle)."""
    from rosafx.io.atomic import recover
    from rosafx.io.reading import read_json
    adapter_dir = Path(adapter_dir)
    recover(adapter_dir)  # an adapt killed mid-swap: put the old directory back
    if not adapter_dir.is_dir():
        raise RosafxError(f"{adapter_dir} is not a directory: pass an adapter directory written by `rosafx adapt`.")
    path = adapter_dir / SOURCE_NAME
    if not path.exists():
        raise RosafxError(f"{adapter_dir} has no {SOURCE_NAME}: pass a directory written by `rosafx adapt`.")
    raw = read_json(path, "the base model of this adapter")
    if set(raw) != {"path", "kind"} or not all(isinstance(raw[k], str) for k in raw) \
            or raw["kind"] not in SOURCE_KINDS:
        raise RosafxError(f"{path} must be exactly {{\"path\": \"...\", \"kind\": one of {list(SOURCE_KINDS)}}}, "
                          f"got keys {sorted(raw)}. Re-run `rosafx adapt` to write it.")
    model = Path(raw["path"])
    if not model.exists():
        raise RosafxError(f"{path} names the base model {model}, which does not exist. Move the model back or "
                          f"edit {SOURCE_NAME}.")
    source = identify(model)
    if source.kind != raw["kind"]:
        raise RosafxError(f"{path} says {model} is a '{raw['kind']}' model, but it is a '{source.kind}'. "
                          f"Edit {SOURCE_NAME} or re-run `rosafx adapt`.")
    return source


def identify(path) -> ModelSource:
    path = Path(path)
    if not path.exists():
        raise RosafxError(f"{path} does not exist. MODEL is a Hugging Face model directory, a .pt2 file "
                          "from torch.export.save, or a pickled .pt module.")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise RosafxError(f"{path} is a directory without config.json: not a Hugging Face model directory.")
        return ModelSource(str(path.resolve()), "hf")
    from rosafx.io.reading import check_regular_file
    check_regular_file(path, "MODEL: a Hugging Face model directory, a .pt2 file or a pickled .pt")
    if path.suffix == ".pt2":
        return ModelSource(str(path.resolve()), "pt2")
    if path.suffix in PICKLE_SUFFIXES:
        return ModelSource(str(path.resolve()), "pickle")
    raise RosafxError(f"Cannot tell what {path} is: use a Hugging Face model directory, a .pt2 file or a .pt file.")


def open_model(source: ModelSource, *, trust_pickle: bool = False):
    """Return (model or ExportedProgram, example_inputs or None)."""
    if source.kind not in SOURCE_KINDS:
        raise RosafxError(f"Unknown model kind {source.kind!r}; rosafx opens {list(SOURCE_KINDS)}.")
    if source.kind == "hf":
        return _open_hf(Path(source.path), trust_pickle), None
    if source.kind == "pt2":
        from rosafx.io.pt2 import load_pt2
        return load_pt2(source.path, trust_pickle=trust_pickle), None
    if not trust_pickle:
        raise RosafxError(f"{source.path} is a pickle, and unpickling runs arbitrary code. If you trust the file, "
                          "pass --trust-pickle; otherwise save the model with torch.export.save as a .pt2.")
    try:
        obj = torch.load(source.path, weights_only=False, map_location="cpu")
    except Exception as exc:
        raise RosafxError(f"Cannot unpickle {source.path} ({type(exc).__name__}: {str(exc)[:200]}).") from exc
    if isinstance(obj, torch.nn.Module):
        return obj.eval(), getattr(obj, "example_inputs", None)
    if isinstance(obj, dict) and isinstance(obj.get("model"), torch.nn.Module):
        return obj["model"].eval(), obj.get("example_inputs")
    raise RosafxError(f"{source.path} holds a {type(obj).__name__}; rosafx needs a pickled nn.Module, or a dict "
                      "{'model': module, 'example_inputs': (tensor, ...)}.")


def _open_hf(directory: Path, trust_pickle: bool = False):
    """transformers reads safetensors weights without unpickling; a directory with only a
    pickled ``pytorch_model.bin`` needs --trust-pickle."""
    import transformers
    from rosafx.io.reading import read_json
    read_json(directory / "config.json", "the Hugging Face model config")  # a clear message for a corrupt file
    if not trust_pickle and not any(directory.glob("*.safetensors")):
        raise RosafxError(f"{directory} has no .safetensors weights; its pickled weights (pytorch_model.bin) "
                          "run code when loaded. Pass --trust-pickle if you trust them, or re-save the model with "
                          "save_pretrained (safetensors).")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
        if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
            model_class = transformers.AutoModel
        return model_class.from_pretrained(directory, local_files_only=True, use_safetensors=None if trust_pickle else True,
                                           trust_remote_code=False).eval()
    except Exception as exc:  # corrupt config fields, truncated weights, missing files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise RosafxError(f"Cannot load the Hugging Face model in {directory}: {first}. Check that it holds "
                          "config.json and model.safetensors written by save_pretrained.") from exc
