"""May a command write OUT? Never over its own inputs, never over data rosafx did not write.

A directory is replaced only if it is empty or an earlier rosafx output (every entry one of
``OUTPUT_FILES``, and an adapter record among them), or when the user says ``--overwrite``.
OUT is never the input or a directory that contains it, with or without ``--overwrite``; a
symlink OUT is refused (replacing it would silently redirect or drop the link).
"""
from __future__ import annotations

from pathlib import Path

from rosafx.errors import RosafxError

RECORD_FILES = frozenset({"rosafx.json", "adapter_config.json"})
OUTPUT_FILES = RECORD_FILES | {"adapter.safetensors", "adapter_model.safetensors", "source.json", "README.md"}


def is_rosafx_output(directory) -> bool:
    names = {p.name for p in Path(directory).iterdir()}
    return bool(names & RECORD_FILES) and names <= OUTPUT_FILES


def _overlaps(out: Path, other: Path) -> bool:
    return out == other or out in other.parents


def check_output(out, *, inputs=(), overwrite: bool = False, kind: str = "directory") -> Path:
    """Raise a RosafxError unless writing ``out`` (a ``directory`` or a ``file``) is safe."""
    out = Path(out)
    if out.is_symlink():
        raise RosafxError(f"{out} is a symbolic link; rosafx does not replace links. Pass the real path "
                          f"({out.resolve()}) or a new name.")
    resolved = out.resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if _overlaps(resolved, source):
            raise RosafxError(f"-o {out} is or contains the input {item}; writing it would destroy "
                              "the input. Choose a new output path.")
    if not out.exists():
        return out
    if kind == "directory":
        if not out.is_dir():
            if overwrite:
                return out
            raise RosafxError(f"{out} exists and is a file, not an output directory. Choose a new path, or pass "
                              "--overwrite to replace it.")
        if overwrite or not any(out.iterdir()) or is_rosafx_output(out):
            return out
        raise RosafxError(f"{out} exists and holds files rosafx did not write; refusing to replace it. Choose a "
                          "new path, or pass --overwrite to replace the whole directory.")
    if out.is_dir():
        raise RosafxError(f"{out} is a directory; pass a file name such as {out / 'model.onnx'}.")
    return out
