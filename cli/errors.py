"""The one place CLI errors are formatted: a message, exit code 2 (130 for an interrupt), no
traceback unless ROSAFX_DEBUG=1. Write failures the user can fix (a full disk, a read-only
or forbidden folder, a symlink loop) arrive as OSError naming the path (``rosafx.io.atomic``
names the target, not its hidden temporary) and are said here in one line."""
from __future__ import annotations

import errno
import os
import sys

from rosafx.errors import RosafxError
from rosafx.io.atomic import USER_ERRNOS, target_of, user_errno

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

_ADVICE = {
    errno.ENOSPC: "the disk is full. Free some space (or write elsewhere) and run the command again; what was "
                  "there before is unchanged, and an interrupted `rosafx train` continues with --resume",
    errno.EDQUOT: "the disk quota is used up. Free some space (or write elsewhere) and run the command again; an "
                  "interrupted `rosafx train` continues with --resume",
    errno.EFBIG: "the file is larger than this file system or process allows. Write elsewhere",
    errno.EACCES: "permission denied. Choose a path you may use (an output folder you can write) or fix its "
                  "permissions",
    errno.EPERM: "operation not permitted. Choose a path you may use (an output folder you can write) or fix its "
                 "permissions",
    errno.EROFS: "the file system is read-only. Choose an output folder on a writable disk",
    errno.ELOOP: "the path goes through a symbolic link loop. Pass a real path",
    errno.ENAMETOOLONG: "the name is too long. Choose a shorter path",
}


class Interrupted(RosafxError):
    """Ctrl-C: said in one line, with exit status 130 so that `train && export` stops."""
    exit_code = EXIT_INTERRUPTED


def describe_os_error(exc: BaseException) -> str | None:
    """One line for a write failure the user can fix, or None for anything else."""
    code = user_errno(exc)
    if code not in USER_ERRNOS:
        return None
    path = None
    while exc is not None and path is None:
        path = getattr(exc, "filename", None)
        exc = exc.__cause__ or exc.__context__
    where = f"{target_of(path)}: " if path else ""
    return f"{where}{_ADVICE.get(code, os.strerror(code))}."


def debug_enabled() -> bool:
    return os.environ.get("ROSAFX_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"error: {message}", file=sys.stderr)
    if not debug_enabled():
        print("(set ROSAFX_DEBUG=1 for the full traceback)", file=sys.stderr)
    raise SystemExit(code)
