"""The ``rosafx`` command: thin over the library API, one file per command."""
from __future__ import annotations

import sys

import click
import typer

try:  # newer typer vendors click as typer._click: its exceptions are not click's
    from typer._click.exceptions import ClickException as TyperClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    TyperClickException = click.ClickException

from rosafx.errors import RosafxError

from rosafx.cli.adapt import EXAMPLES as ADAPT_EXAMPLES, adapt
from rosafx.cli.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, debug_enabled, describe_os_error, fail
from rosafx.cli.evaluate import evaluate
from rosafx.cli.export import export
from rosafx.cli.generate import EXAMPLES as GENERATE_EXAMPLES, generate
from rosafx.cli.inspect import inspect
from rosafx.cli.methods import methods
from rosafx.cli.train import EXAMPLES as TRAIN_EXAMPLES, train

app = typer.Typer(name="rosafx", help="Insert adapters into PyTorch models by graph rewriting; merge; export ONNX.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.command(help="Insert adapters into MODEL by rules and write the adapter directory OUT.", epilog=ADAPT_EXAMPLES)(adapt)
app.command(help="Train adapters on MODEL with a data file into the run directory RUN (resumable).",
            epilog=TRAIN_EXAMPLES)(train)
app.command(help="Score a RUN or its exported ONNX on a data file.",
            epilog="Example: rosafx evaluate run --data dev.tsv --json")(evaluate)
app.command(help="Merge an adapter directory or a RUN into its base model and export ONNX (verified with "
            "onnxruntime).", epilog="Example: rosafx export run --merge -o out   (out/model.onnx + tokenizer + config)")(export)
app.command(help="Generate greedily with a causal-lm RUN (torch) or its export (onnxruntime, KV cache).",
            epilog=GENERATE_EXAMPLES)(generate)
app.command(help="List MODEL's linear sites; with rule options, what each would get.",
            epilog="Example: rosafx inspect ./bert --method lora --target query --target value")(inspect)
app.command(help="List the adapter methods, each with what it is (from the method registry).")(methods)


def main(argv: list[str] | None = None) -> None:
    try:
        # the raw arguments travel in obj: `train --nproc N` hands them to torchrun
        code = app(args=argv, prog_name="rosafx", standalone_mode=False,
                   obj={"argv": list(sys.argv[1:] if argv is None else argv)})
    except RosafxError as exc:
        if debug_enabled():
            raise
        fail(str(exc), getattr(exc, "exit_code", EXIT_USER_ERROR))
    except (click.exceptions.Abort, typer.Abort):
        fail("aborted")
    except (click.ClickException, TyperClickException) as exc:
        exc.show()  # usage text and the one-line reason
        raise SystemExit(2)
    except SystemExit:
        raise
    except Exception as exc:  # an internal error: still no traceback unless asked
        if debug_enabled():
            raise
        fixable = describe_os_error(exc)  # a full disk, a read-only folder, a link loop: the user's to fix
        fail(fixable or f"internal error: {type(exc).__name__}: {exc}", code=EXIT_USER_ERROR if fixable else 1)
    # typer turns Ctrl-C (KeyboardInterrupt) into a returned 130 when not standalone: never exit 0 on it
    if code == EXIT_INTERRUPTED:
        fail("interrupted; nothing half-written was left (outputs are replaced whole or not at all).", code)
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
