"""Write files and directories under a temporary name, then rename: never a half-written file."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def make_public(path: Path) -> None:
    """mkstemp/mkdtemp create owner-only files; give them the permissions a plain write would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_directory(directory):
    """Yield a temporary directory beside ``directory``; on success it replaces ``directory``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        make_public(tmp)
        for item in tmp.iterdir():
            make_public(item)
        if directory.exists():
            backup = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(directory, backup)
            os.replace(tmp, directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        make_public(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
