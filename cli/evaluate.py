"""rosafx evaluate (RUN | OUT/model.onnx) --data dev.tsv [--json]"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rosafx.recipes.evaluation import evaluate_path


def evaluate(target: Annotated[Path, typer.Argument(help="A RUN from `rosafx train`, or OUT/model.onnx from "
                                                    "`rosafx export RUN`")],
             data: Annotated[Path, typer.Option(help="Data to score, read as the run read its training data")],
             as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False) -> None:
    """Score a trained run or its ONNX export on DATA with the task's metrics."""
    result = evaluate_path(target, data)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for key, value in result.items():
        typer.echo(f"{key:<16} {value:.4f}" if isinstance(value, float) else f"{key:<16} {value}")
