"""Read the JSON and safetensors files rosafx is given, with errors a user can act on.

JSON: strict (``NaN``/``Infinity`` are not JSON and are refused), UTF-8, of the expected
top-level type. safetensors: a truncated or foreign file is a ``RosafxError`` naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

from rosafx.errors import RosafxError


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number (use a finite number)")


def read_json(path, what: str, expect: type = dict):
    """The parsed content of ``path``; ``what`` says what the file is for the message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RosafxError(f"{path} does not exist ({what}).") from None
    except IsADirectoryError:
        raise RosafxError(f"{path} is a directory, expected {what} (a JSON file).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RosafxError(f"Cannot read {path} ({what}): {exc}.") from exc
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise RosafxError(f"{path} ({what}) is not valid JSON: {str(exc)[:200]}. Fix or re-create the file.") from exc
    if not isinstance(value, expect):
        raise RosafxError(f"{path} ({what}) holds a JSON {type(value).__name__}, expected a JSON "
                          f"{'object' if expect is dict else expect.__name__}.")
    return value


def read_safetensors(path, what: str) -> dict:
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise RosafxError(f"{path} is missing ({what}).")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError: truncated, empty or not safetensors
        raise RosafxError(f"{path} ({what}) is damaged or not a safetensors file "
                          f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}). "
                          "Re-create it.") from exc
