"""Run the ``rosafx`` command in-process and return its exit code (0 when it returns)."""
from rosafx.cli.main import main


def run_cli(*argv) -> int:
    try:
        main([str(a) for a in argv])
        return 0
    except SystemExit as exc:
        return exc.code
