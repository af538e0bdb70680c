"""Options shared by several commands (typer annotations); `rosafx.recipes.rule_flags` makes rules of them,
and `flag` makes a `rosafx train` flag of an entry in the options table."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rosafx.recipes.options import OPTIONS
from rosafx.recipes.rule_flags import build_rules  # noqa: F401  (the commands' one way from flags to rules)

ModelArg = Annotated[Path, typer.Argument(help="HF model directory, .pt2 (torch.export.save) or pickled .pt")]
PYTHON_TYPES = {"path": Path, "text": str, "texts": list[str], "int": int, "float": float, "bool": bool,
                "choice": str, "bool-or-choice": bool}


def flag(name: str, *declarations: str):
    """The typer annotation of an option in the options table (rosafx/recipes/options.py): its
    type and help come from there; ``declarations`` are the flag's spellings when not the
    default (``--grad-checkpoint/--no-grad-checkpoint``, a short ``-t``). Unset is None, so
    that a --config file or run.json can give the value; the table checks it."""
    option = OPTIONS[name]
    return Annotated[Optional[PYTHON_TYPES[option.kind]], typer.Option(*declarations, help=option.help)]


MethodOpt = flag("method", "--method", "-m")
TargetOpt = flag("target", "--target", "-t")
RankOpt = flag("rank", "--rank", "-r")
AlphaOpt = flag("alpha", "--alpha")
OptionOpt = flag("option", "--option", "-O")
RulesOpt = flag("rules", "--rules")
QuantizeOpt = flag("quantize", "--quantize")
QuantizeGroupOpt = flag("quantize_group_size", "--quantize-group-size")
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow unpickling: a pickled .pt, or a .pt2 with "
                     "pickled entries (runs code from the file; see docs/security.md)")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUT even if it holds files rosafx did not "
                         "write (never the input)")]
