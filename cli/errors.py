"""The one place CLI errors are formatted: a message, exit code 2, no traceback unless
ROSAFX_DEBUG=1."""
from __future__ import annotations

import os
import sys

EXIT_USER_ERROR = 2


def debug_enabled() -> bool:
    return os.environ.get("ROSAFX_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"error: {message}", file=sys.stderr)
    if not debug_enabled():
        print("(set ROSAFX_DEBUG=1 for the full traceback)", file=sys.stderr)
    raise SystemExit(code)
