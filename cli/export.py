"""rosafx export ADAPTED --merge -o model.onnx"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

import rosafx
from rosafx.errors import RosafxError
from rosafx.loading import ModelSource, open_model
from rosafx.run_model import export_run
from rosafx.runs import is_run

from .options import TrustOpt


def export(adapted: Annotated[Path, typer.Argument(help="Adapter directory written by `rosafx adapt`, or a RUN "
                                                    "from `rosafx train`")],
           out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write (for a RUN: a directory with "
                                             "model.onnx, tokenizer and config)")],
           merge: Annotated[bool, typer.Option("--merge/--no-merge", help="Fold adapters into the weights "
                                               "(required: adapter ops have no ONNX form)")] = True,
           trust_pickle: TrustOpt = False) -> None:
    """Merge the adapter into its base model and export ONNX, verified with onnxruntime.

    Example: rosafx export bert-lora --merge -o bert.onnx
    """
    if is_run(adapted):
        typer.echo(str(export_run(adapted, out, merge=merge)))
        return
    source_file = Path(adapted) / "source.json"
    if not source_file.exists():
        raise RosafxError(f"{adapted} has no source.json: pass a directory written by `rosafx adapt`.")
    source = ModelSource(**json.loads(source_file.read_text()))
    module, example_inputs = open_model(source, trust_pickle=trust_pickle)
    model = rosafx.load(module, adapted, example_inputs=example_inputs)
    report = rosafx.export_onnx(model, out, merge=merge)
    typer.echo(str(report))
