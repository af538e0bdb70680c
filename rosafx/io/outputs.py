"""May a command write OUT? Never over its own inputs, never over data rosafx did not write.

One rule for files and directories, for every command: OUT is never an input, a directory
that contains an input, or a path inside an input (with or without ``--overwrite``). An
existing directory is replaced only if it is empty or an earlier rosafx output (every entry
one of ``OUTPUT_FILES`` with an adapter record among them, or a `rosafx export RUN` folder
with its ``EXPORT_MARK``), or when the user says ``--overwrite``. An existing file is
replaced only with ``--overwrite``: a file carries no mark that says rosafx wrote it. A
symlink OUT is refused (replacing it would silently redirect or drop the link). Run
directories (`rosafx train -o RUN`) follow the same rule about inputs and add their own
(``rosafx.training.runs``).
"""
from __future__ import annotations

import errno
from pathlib import Path

from rosafx.errors import RosafxError

RECORD_FILES = frozenset({"rosafx.json", "adapter_config.json"})
OUTPUT_FILES = RECORD_FILES | {"adapter.safetensors", "adapter_model.safetensors", "source.json", "README.md"}
EXPORT_MARK = "rosafx_export.json"  # marks a `rosafx export RUN -o OUT` folder


def is_rosafx_output(directory) -> bool:
    names = {p.name for p in Path(directory).iterdir()}
    return (bool(names & RECORD_FILES) and names <= OUTPUT_FILES) or EXPORT_MARK in names


def resolve(path) -> Path:
    """``path`` with symlinks resolved; a symlink loop is a user error, not a crash."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: Python < 3.13 on a loop; OSError(ELOOP) after
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise
        raise RosafxError(f"{path} goes through a symbolic link loop; pass a real path.") from exc


def check_apart(out, inputs) -> Path:
    """Raise unless ``out`` is apart from every input: not it, not a directory containing it,
    not inside it. Returns ``out`` resolved."""
    resolved = resolve(out)
    for item in inputs:
        if item is None:
            continue
        source = resolve(item)
        if resolved == source or resolved in source.parents:
            raise RosafxError(f"-o {out} is or contains the input {item}; writing it would destroy "
                              "the input. Choose a new output path.")
        if source in resolved.parents:
            raise RosafxError(f"-o {out} is inside the input {item}; rosafx never writes into its inputs. "
                              "Choose an output path outside it.")
    return resolved


def check_output(out, *, inputs=(), overwrite: bool = False, kind: str = "directory") -> Path:
    """Raise a RosafxError unless writing ``out`` (a ``directory`` or a ``file``) is safe."""
    out = Path(out)
    if out.is_symlink():
        raise RosafxError(f"{out} is a symbolic link; rosafx does not replace links. Pass the real path "
                          f"({resolve(out)}) or a new name.")
    check_apart(out, inputs)
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
    if not overwrite:
        raise RosafxError(f"{out} exists; rosafx replaces an existing file only with --overwrite. Choose a new "
                          "name, or pass --overwrite.")
    return out
