"""rosafx export ADAPTED --merge -o model.onnx"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import rosafx
from rosafx.recipes.loading import open_model, read_source
from rosafx.io.atomic import naming
from rosafx.io.outputs import check_output
from rosafx.passes.onnx_weights import DEFAULT_GROUP_SIZE, SCHEMES, check_scheme
from rosafx.recipes.run_model import export_run
from rosafx.training.runs import is_run

from rosafx.cli.options import OverwriteOpt, TrustOpt


def export(adapted: Annotated[Path, typer.Argument(help="Adapter directory written by `rosafx adapt`, or a RUN "
                                                    "from `rosafx train`")],
           out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write (for a RUN: a directory with "
                                             "model.onnx, tokenizer and config)")],
           merge: Annotated[bool, typer.Option("--merge/--no-merge", help="Fold adapters into the weights "
                                               "(required: adapter ops have no ONNX form)")] = True,
           weights: Annotated[Optional[str], typer.Option("--weights", help="Quantize the merged weights again: "
                                                          f"{' | '.join(SCHEMES)} (every linear layer a MatMulNBits; "
                                                          "the added error is measured and printed)")] = None,
           group_size: Annotated[int, typer.Option("--group-size", help="Weights per quantization block "
                                                   "(a power of two, 16 or more)")] = DEFAULT_GROUP_SIZE,
           trust_pickle: TrustOpt = False, overwrite: OverwriteOpt = False) -> None:
    """Merge the adapter into its base model and export ONNX, verified with onnxruntime.

    Example: rosafx export bert-lora --merge -o bert.onnx
    Example: rosafx export RUN --merge --weights int4 -o OUT
    """
    check_scheme(weights, group_size, merge=merge)  # before anything loads
    if is_run(adapted):
        report = export_run(adapted, out, merge=merge, overwrite=overwrite, weights=weights,
                            group_size=group_size)
        typer.echo(str(report))
        if getattr(report, "decoder", None) is not None:  # a decoder's KV-cache ONNX, for `rosafx generate`
            typer.echo(str(report.decoder))
        return
    source = read_source(adapted)  # untrusted: it names the model, the user's flags decide what may load
    check_output(out, inputs=[adapted, source.path], overwrite=overwrite, kind="file")  # before the slow work
    module, example_inputs = open_model(source, trust_pickle=trust_pickle)
    model = rosafx.load(module, adapted, example_inputs=example_inputs)
    with naming(out):  # a full disk or a read-only folder is said of OUT, not of its hidden temporary
        report = rosafx.export_onnx(model, out, merge=merge, weights=weights, group_size=group_size)
    typer.echo(str(report))
