"""Write files and directories under a temporary name, then rename: never a half-written file.

Crash safety (kill -9 at any moment): a reader finds the old or the new output whole.

* A temporary sits beside its target as ``.NAME.rosafx-tmp-PID-XXXX``. Whoever next writes
  ``NAME`` (or calls ``clean_leftovers``) removes temporaries whose process is gone; those
  of a live process (a concurrent export) are left alone.
* A file is replaced with one ``os.replace`` (atomic on POSIX).
* A directory is replaced with ``renameat2(RENAME_EXCHANGE)``, one atomic swap of the new
  and old directory; the old one then sits under the temporary name and is removed. Where
  the kernel or file system lacks the exchange, two renames are used with the old
  directory parked as ``.NAME.rosafx-old-PID``; ``recover`` (run by every writer and by
  ``read_directory``) puts it back if a crash fell between the two renames.
* A failure the user can fix (a full disk, a read-only folder, a link loop) leaves as an
  ``OSError`` naming the target, not its hidden temporary (``naming``).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import RosafxError  # relative: tests load this file alone, without torch

TMP_TAG, OLD_TAG = "rosafx-tmp", "rosafx-old"
# What a user can fix (free space, a writable folder, a real path): raised as OSError naming
# the target, which the CLI prints as one line (rosafx/cli/errors.py).
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ELOOP,
                         errno.ENAMETOOLONG, errno.EFBIG})
_RUST_IO_ERROR = re.compile(r"Os \{ code: (\d+)")  # safetensors' writer reports io errors in Rust's format
_LEFTOVER = re.compile(rf"\.(?P<name>.+)\.(?:{TMP_TAG}|{OLD_TAG})-(?P<pid>\d+)(?:-.*)?")


def make_public(path: Path) -> None:
    """mkstemp/mkdtemp create owner-only files; give them the permissions a plain write would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def remove_path(path: Path) -> None:
    """Remove a file, a symlink (not its target) or a directory tree; errors are raised."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(target) -> list[Path]:
    """Remove temporaries of ``target`` left by processes that no longer run."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        match = _LEFTOVER.fullmatch(entry.name)
        if match and match["name"] == target.name and OLD_TAG not in entry.name and not _alive(int(match["pid"])):
            remove_path(entry)
            removed.append(entry)
    return removed


def target_of(path) -> Path:
    """The output a hidden temporary stands for (``.NAME.rosafx-tmp-PID-X`` -> ``NAME``); any
    other path as it is. Errors name the target, which the user knows, not the temporary."""
    path = Path(path)
    for part in (path, *path.parents):
        match = _LEFTOVER.fullmatch(part.name)
        if match:
            return part.with_name(match["name"])
    return path


def remove_atomically(path) -> None:
    """Remove ``path`` so that a kill at any moment leaves it whole or gone from view: it is
    first renamed to a hidden temporary (one rename), then deleted; a kill during the delete
    leaves only that temporary, which ``clean_leftovers_in`` removes later."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    clean_leftovers_in(path.parent)
    hidden = path.with_name(f"{temp_name(path)}del")
    os.replace(path, hidden)
    remove_path(hidden)


def clean_leftovers_in(directory) -> list[Path]:
    """``clean_leftovers`` for every name in ``directory`` (e.g. a folder of checkpoints)."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            match = _LEFTOVER.fullmatch(entry.name)
            if match and OLD_TAG not in entry.name and not _alive(int(match["pid"])):
                remove_path(entry)
                removed.append(entry)
    return removed


def recover(directory) -> None:
    """Undo a crash between the two renames of the fallback swap: restore the old directory
    if the new one never arrived, else drop the parked copy."""
    directory = Path(directory)
    if not directory.parent.is_dir():
        return
    for entry in directory.parent.iterdir():
        match = _LEFTOVER.fullmatch(entry.name)
        if not (match and match["name"] == directory.name and OLD_TAG in entry.name) or _alive(int(match["pid"])):
            continue
        if directory.exists() or directory.is_symlink():
            remove_path(entry)
        else:
            os.replace(entry, directory)


def temp_name(target: Path) -> str:
    return f".{target.name}.{TMP_TAG}-{os.getpid()}-"


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the running process's symbols, libc among them
    except OSError:
        return False
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def prepare_parent(target: Path) -> None:
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise RosafxError(f"Cannot write {target}: {parent} is a file, not a directory. Choose another path.")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError) as exc:
        raise RosafxError(f"Cannot write {target}: a part of {parent} is a file, not a directory.") from exc
    except PermissionError as exc:
        raise RosafxError(f"Cannot write {target}: no permission to create {parent}.") from exc
    recover(target)
    clean_leftovers(target)


def user_errno(exc: BaseException) -> int | None:
    """The errno of a write failure the user can fix, found in ``exc`` or what caused it
    (safetensors wraps the OS error in its own type and message)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in USER_ERRNOS:
            return exc.errno
        match = _RUST_IO_ERROR.search(str(exc)) if not isinstance(exc, OSError) else None
        if match and int(match[1]) in USER_ERRNOS:
            return int(match[1])
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


@contextmanager
def naming(target):
    """Re-raise a fixable write failure (disk full, read-only, a link loop) as an OSError that
    names ``target``, not the hidden temporary it happened in."""
    try:
        yield
    except Exception as exc:
        code = None if isinstance(exc, RosafxError) else user_errno(exc)  # a RosafxError already says it
        if code is None or (isinstance(exc, OSError) and exc.filename == str(target)):
            raise
        raise OSError(code, os.strerror(code), str(target)) from exc


@contextmanager
def atomic_directory(directory):
    """Yield a temporary directory beside ``directory``; on success it replaces ``directory``.
    Whether replacing an existing ``directory`` is allowed is the caller's decision (see
    ``rosafx.io.outputs``)."""
    directory = Path(directory)
    with naming(directory):
        prepare_parent(directory)
        tmp = Path(tempfile.mkdtemp(prefix=temp_name(directory), dir=directory.parent))
        try:
            yield tmp
            make_public(tmp)
            for item in tmp.iterdir():
                make_public(item)
            _fsync_tree(tmp)
            install(tmp, directory)
        finally:
            if tmp.exists() or tmp.is_symlink():
                remove_path(tmp)  # the failed new output, or the old one after the exchange


def install(tmp: Path, directory: Path, attempts: int = 5) -> None:
    """Put ``tmp`` in ``directory``'s place. Another writer may create or replace
    ``directory`` between looking and renaming (a rename onto a non-empty directory then
    fails with ENOTEMPTY): look again and take the other path; the last writer wins."""
    for attempt in range(attempts):
        try:
            if directory.exists() or directory.is_symlink():
                if exchange(tmp, directory):
                    return
                parked = directory.with_name(f".{directory.name}.{OLD_TAG}-{os.getpid()}")
                os.replace(directory, parked)
                try:
                    os.replace(tmp, directory)
                finally:
                    remove_path(parked)
            else:
                os.replace(tmp, directory)
            return
        except OSError as exc:
            raced = exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT)
            if not raced or attempt == attempts - 1:
                raise


def temp_file_beside(path) -> Path:
    """An empty temporary file beside ``path`` (for writers that rename it themselves with
    ``os.replace``); leftovers of killed runs are removed first."""
    path = Path(path)
    with naming(path):
        prepare_parent(path)
        if path.is_dir() and not path.is_symlink():
            raise RosafxError(f"Cannot write the file {path}: it is a directory. Choose a file name.")
        fd, tmp = tempfile.mkstemp(prefix=temp_name(path), suffix=path.suffix, dir=path.parent)
        os.close(fd)
        make_public(Path(tmp))
        return Path(tmp)


@contextmanager
def atomic_file(path):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    with naming(path):
        prepare_parent(path)
        if path.is_dir() and not path.is_symlink():
            raise RosafxError(f"Cannot write the file {path}: it is a directory. Choose a file name.")
        fd, tmp = tempfile.mkstemp(prefix=temp_name(path), dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            make_public(Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def _fsync_tree(directory: Path) -> None:
    """Data reaches the disk before the rename makes it visible (a power cut, not only a kill)."""
    for item in directory.iterdir():
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
