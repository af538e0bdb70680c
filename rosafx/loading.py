"""Open a model the user names on the command line: an HF directory, a ``.pt2`` from
``torch.export.save``, or a pickled ``.pt`` module (only on explicit trust)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import RosafxError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


@dataclass
class ModelSource:
    path: str
    kind: str            # "hf" | "pt2" | "pickle"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def identify(path) -> ModelSource:
    path = Path(path)
    if not path.exists():
        raise RosafxError(f"{path} does not exist. MODEL is a Hugging Face model directory, a .pt2 file "
                          "from torch.export.save, or a pickled .pt module.")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise RosafxError(f"{path} is a directory without config.json: not a Hugging Face model directory.")
        return ModelSource(str(path.resolve()), "hf")
    if path.suffix == ".pt2":
        return ModelSource(str(path.resolve()), "pt2")
    if path.suffix in PICKLE_SUFFIXES:
        return ModelSource(str(path.resolve()), "pickle")
    raise RosafxError(f"Cannot tell what {path} is: use a Hugging Face model directory, a .pt2 file or a .pt file.")


def open_model(source: ModelSource, *, trust_pickle: bool = False):
    """Return (model or ExportedProgram, example_inputs or None)."""
    if source.kind == "hf":
        return _open_hf(Path(source.path)), None
    if source.kind == "pt2":
        return torch.export.load(source.path), None
    if not trust_pickle:
        raise RosafxError(f"{source.path} is a pickle, and unpickling runs arbitrary code. If you trust the file, "
                          "pass --trust-pickle; otherwise save the model with torch.export.save as a .pt2.")
    obj = torch.load(source.path, weights_only=False, map_location="cpu")
    if isinstance(obj, torch.nn.Module):
        return obj.eval(), getattr(obj, "example_inputs", None)
    if isinstance(obj, dict) and isinstance(obj.get("model"), torch.nn.Module):
        return obj["model"].eval(), obj.get("example_inputs")
    raise RosafxError(f"{source.path} holds a {type(obj).__name__}; rosafx needs a pickled nn.Module, or a dict "
                      "{'model': module, 'example_inputs': (tensor, ...)}.")


def _open_hf(directory: Path):
    import transformers
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    model_class = model_class or transformers.AutoModel
    return model_class.from_pretrained(directory, local_files_only=True).eval()
