"""Options shared by several commands (typer annotations); `rosafx.recipes.rule_flags` makes rules of them."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rosafx.recipes.rule_flags import build_rules  # noqa: F401  (the commands' one way from flags to rules)

ModelArg = Annotated[Path, typer.Argument(help="HF model directory, .pt2 (torch.export.save) or pickled .pt")]
MethodOpt = Annotated[Optional[str], typer.Option("--method", "-m", help="Adapter method id (see `rosafx methods`)")]
TargetOpt = Annotated[Optional[list[str]], typer.Option("--target", "-t", help="Site pattern: exact path, "
                      "dot-suffix or regex; repeatable. Default: every linear site except output heads")]
RankOpt = Annotated[Optional[int], typer.Option("--rank", "-r", help="Adapter rank")]
AlphaOpt = Annotated[Optional[float], typer.Option("--alpha", help="Scaling numerator (lora, lora-ga, rosa-robust)")]
OptionOpt = Annotated[Optional[list[str]], typer.Option("--option", "-O", help="Extra method option KEY=VALUE "
                      "(e.g. density=0.01); repeatable")]
RulesOpt = Annotated[Optional[Path], typer.Option("--rules", help="JSON file {pattern: config}; overrides the "
                     "options above")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow unpickling: a pickled .pt, or a .pt2 with "
                     "pickled entries (runs code from the file; see docs/security.md)")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUT even if it holds files rosafx did not "
                         "write (never the input)")]
