"""Shared by tests/test_faults*.py: run the CLI in-process and check the contract every
fault row asserts (exit 2, one line naming the bad thing, no traceback, nothing written)."""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from rosafx.cli.main import main


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def message(self) -> str:
        lines = [line for line in self.err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, f"expected one 'error:' line, got:\n{self.err}"
        return lines[0]


def cli(capsys, *argv) -> Result:
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_user_error(result: Result, *names: str) -> str:
    """Exit 2, one ``error:`` line that names each of ``names``, no traceback, not internal."""
    assert result.code == 2, f"exit {result.code}, expected 2\nstdout: {result.out}\nstderr: {result.err}"
    text = result.out + result.err
    assert "Traceback" not in text and "internal error" not in text, text
    message = result.message
    for name in names:
        assert name.lower() in message.lower(), f"{name!r} not in {message!r}"
    return message


def snapshot(path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) with a hash of its bytes: compare
    before and after to prove prior data intact."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return {}
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def leftovers(directory) -> list[str]:
    """Hidden temporaries rosafx left beside its outputs."""
    return sorted(p.name for p in Path(directory).iterdir() if ".rosafx-" in p.name or p.name.endswith(".tmp"))


def copy_tree(src, dst) -> Path:
    shutil.copytree(src, dst) if Path(src).is_dir() else shutil.copy(src, dst)
    return Path(dst)
