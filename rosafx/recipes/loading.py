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
    """The model class its config names (else AutoModel), through ``hf_pretrained``."""
    import transformers
    config = hf_config(directory)
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        model_class = transformers.AutoModel
    return hf_pretrained(model_class, directory, trust_pickle=trust_pickle)


# The one way every command opens a Hugging Face directory: its config (hf_config) and its
# weights (hf_pretrained), with one set of checks and messages for adapt, inspect, train,
# evaluate and export alike.
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
LOAD_HINT = "Check that it holds config.json and model.safetensors written by save_pretrained."


def hf_config(directory):
    """The directory's transformers config; a corrupt file or an unknown model type is a
    RosafxError naming the directory."""
    import transformers
    from rosafx.io.reading import read_json
    directory = Path(directory)
    read_json(directory / "config.json", "the Hugging Face model config")  # a clear message for a corrupt file
    try:
        return transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # an unknown model_type, a field of the wrong type, a remote-code model
        raise RosafxError(f"Cannot read the Hugging Face config in {directory}: {_first_line(exc)}. "
                          "rosafx opens model types this transformers knows, without remote code.") from exc


def check_hf_weights(directory, trust_pickle: bool = False) -> None:
    """Safetensors weights, or pickled ones only with --trust-pickle (they run code when loaded)."""
    directory = Path(directory)
    safetensors = sorted(directory.glob("*.safetensors"))
    for path in safetensors:  # the header and the file's length: a truncated file is found before any work
        _check_safetensors_header(path)
    if safetensors:
        return
    pickled = [name for name in PICKLED_WEIGHTS if (directory / name).exists()]
    if not pickled:
        raise RosafxError(f"{directory} holds no model weights (model.safetensors): save the model there with "
                          "save_pretrained.")
    if not trust_pickle:
        raise RosafxError(f"{directory} has no .safetensors weights; its pickled weights ({pickled[0]}) run code "
                          "when loaded. Re-save the model with save_pretrained (safetensors), or, if you trust the "
                          "file, pass --trust-pickle (adapt, inspect and export take it; train does not).")


def _check_safetensors_header(path: Path) -> None:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # SafetensorError: truncated, empty, not safetensors
        raise RosafxError(f"{path} is damaged or not a safetensors file ({_first_line(exc)}). {LOAD_HINT}") from exc


def hf_pretrained(model_class, directory, *, trust_pickle: bool = False, **extra):
    """``model_class.from_pretrained(directory)`` in eval mode, after ``check_hf_weights``;
    truncated weights or a missing file are a RosafxError naming the directory."""
    directory = Path(directory)
    check_hf_weights(directory, trust_pickle)
    try:
        return model_class.from_pretrained(directory, local_files_only=True, trust_remote_code=False,
                                           use_safetensors=None if trust_pickle else True, **extra).eval()
    except Exception as exc:  # corrupt config fields, truncated weights, missing files
        raise RosafxError(f"Cannot load the Hugging Face model in {directory}: {_first_line(exc)}. {LOAD_HINT}") \
            from exc


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240].rstrip(".")
