"""One writer per RUN: an exclusive ``flock`` on ``RUN/.lock``, held while `rosafx train`
writes the run. The kernel drops the lock when its process ends, however it ends (kill -9
included), so a crashed writer never blocks the next one; the file itself stays (removing
a lock file races with the next writer) and holds the pid of its last holder.

A fresh run is built in a staging directory with its own lock and swapped into RUN, so the
lock file at ``RUN/.lock`` can change inode under a waiting process: after locking, the
holder checks that the path still names the file it locked, and looks again if not.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from rosafx.errors import RosafxError

LOCK = ".lock"


def _in_use(run_dir: Path, fd: int | None) -> RosafxError:
    holder = ""
    if fd is not None:
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            holder = f" (pid {text})" if text.isdigit() else ""
        except OSError:
            pass
    return RosafxError(f"{run_dir} is in use by another rosafx process{holder} writing into it; wait for it to "
                       "finish, or choose another -o.")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


class RunLock:
    """The held lock of one run directory; ``release`` (or the process ending) frees it."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self.fd = Path(run_dir), fd

    @classmethod
    def take(cls, run_dir, attempts: int = 3) -> "RunLock":
        """Lock ``run_dir`` (an existing directory) or raise a RosafxError naming it."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK
        for _ in range(attempts):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            if not _try_lock(fd):
                error = _in_use(run_dir, fd)
                os.close(fd)
                raise error
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return cls(run_dir, fd)
            os.close(fd)  # RUN was swapped between our open and our lock: the file we hold is gone
        raise _in_use(run_dir, None)

    @staticmethod
    def check_free(run_dir) -> None:
        """Raise if another process holds ``run_dir``'s lock; create nothing (a quick look
        before the slow work; ``take`` is what counts)."""
        path = Path(run_dir) / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return  # no lock file (never held), or one we cannot open: ``take`` decides
        try:
            if not _try_lock(fd):
                raise _in_use(Path(run_dir), fd)
        finally:
            os.close(fd)  # closing drops the probe's lock

    def moved_to(self, run_dir) -> "RunLock":
        """The staging directory this lock was taken in is now ``run_dir``."""
        self.run_dir = Path(run_dir)
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
