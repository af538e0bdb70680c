"""Read the files rosafx is given, with errors a user can act on. Every JSON, YAML, rules
and config file goes through here, and so does the ``.pt2`` reader's one read of its archive.

Files: only regular files are read (a directory, FIFO, device or socket is named as what it
is: ``/dev/zero`` would be read until memory runs out, a FIFO blocks forever), and a text file
is read up to a size limit, never past it. JSON: strict (``NaN``/``Infinity`` are not JSON
and are refused), UTF-8, of the expected top-level type. YAML: the safe loader without
aliases (``*name``), so a small file cannot expand into a large value. safetensors: a
truncated or foreign file is a ``RosafxError`` naming it.
"""
from __future__ import annotations

import functools
import json
import os
import stat
from pathlib import Path

from rosafx.errors import RosafxError

MiB = 1 << 20
# Adapter records list every site; 64 MiB is far above the largest model's record.
JSON_LIMIT = 64 * MiB
# Hand-written files: a --config or --rules file, a data-free options file.
SMALL_FILE_LIMIT = 1 * MiB


def _kind_of(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular_file(path, what: str) -> Path:
    """``path`` if it names a regular file (through symbolic links); else a RosafxError that
    says what it is instead. ``what`` says what the file is for, for the message."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise RosafxError(f"{path} does not exist ({what}).") from None
    except OSError as exc:  # a symlink loop, a name too long, no permission
        raise RosafxError(f"Cannot open {path} ({what}): {exc.strerror or exc}.") from None
    kind = _kind_of(mode)
    if kind is not None:
        raise RosafxError(f"{path} is {kind}, not a file; expected {what}.")
    return path


def read_bytes(path, what: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (None: no limit).

    Opened without blocking and checked again on the open descriptor, so a file replaced
    by a FIFO or device between the check and the open is still refused, not waited on."""
    path = check_regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise RosafxError(f"Cannot open {path} ({what}): {exc.strerror or exc}.") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        kind = _kind_of(info.st_mode)
        if kind is not None:
            raise RosafxError(f"{path} is {kind}, not a file; expected {what}.")
        if limit is not None and info.st_size > limit:
            raise RosafxError(f"{path} ({what}) is {info.st_size:,} bytes; rosafx reads at most {limit:,} "
                              "bytes of such a file. Check that it is the file you meant.")
        try:
            data = handle.read() if limit is None else handle.read(limit + 1)
        except OSError as exc:
            raise RosafxError(f"Cannot read {path} ({what}): {exc.strerror or exc}.") from None
    if limit is not None and len(data) > limit:  # grew while read
        raise RosafxError(f"{path} ({what}) is over {limit:,} bytes; rosafx reads at most that much of such a file.")
    return data


def read_text(path, what: str, limit: int = SMALL_FILE_LIMIT) -> str:
    """The UTF-8 text of the regular file ``path``, at most ``limit`` bytes."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RosafxError(f"{path} ({what}) is not UTF-8 text (byte {exc.start}): re-save it as UTF-8.") from None


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number (use a finite number)")


def read_json(path, what: str, expect: type = dict, limit: int = JSON_LIMIT):
    """The parsed content of ``path``; ``what`` says what the file is for the message."""
    path = Path(path)
    text = read_text(path, what, limit)
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise RosafxError(f"{path} ({what}) is not valid JSON: {str(exc)[:200]}. Fix or re-create the file.") from exc
    return _expect(path, what, value, expect, "JSON")


def read_yaml(path, what: str, expect: type = dict, limit: int = SMALL_FILE_LIMIT):
    """The parsed content of a YAML file: safe types only, no aliases (a 483-byte file of
    nested aliases expands to gigabytes), nesting bounded by the parser's recursion."""
    import yaml
    path = Path(path)
    text = read_text(path, what, limit)
    try:
        value = yaml.load(text, Loader=_no_alias_loader())  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:  # a bad date, a 5000-digit int, !!float x
        first = " ".join(str(exc).split())[:200]
        raise RosafxError(f"{path} ({what}) is not valid YAML: {first}. Fix the file.") from None
    except RecursionError:
        raise RosafxError(f"{path} ({what}) is nested too deeply; an options file holds flat values.") from None
    return _expect(path, what, value, expect, "YAML")


def read_json_or_yaml(path, what: str, expect: type = dict, limit: int = SMALL_FILE_LIMIT):
    """A ``.json`` file as strict JSON, anything else as YAML."""
    if Path(path).suffix.lower() == ".json":
        return read_json(path, what, expect, limit)
    return read_yaml(path, what, expect, limit)


def _expect(path: Path, what: str, value, expect: type, language: str):
    if not isinstance(value, expect):
        raise RosafxError(f"{path} ({what}) holds a {language} {type(value).__name__}, expected a {language} "
                          f"{'object' if expect is dict else expect.__name__}.")
    return value


@functools.cache
def _no_alias_loader():
    """yaml's SafeLoader, refusing aliases (imported on first use: most commands read no YAML)."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name, <<: *name) are not allowed in rosafx files; write the value out",
                    mark)
            return super().compose_node(parent, index)

    return NoAliasLoader


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
