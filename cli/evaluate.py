"""rosafx evaluate (RUN | OUT/model.onnx) --data dev.tsv [--json]
rosafx evaluate RUN --data test.jsonl --max-new-tokens 256 --extract gsm8k   (causal-lm: + exact match)"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from rosafx.recipes.data.extractors import PRESETS
from rosafx.recipes.evaluation import DEFAULT_NEW_TOKENS, evaluate_path


def evaluate(target: Annotated[Path, typer.Argument(help="A RUN from `rosafx train`, or OUT/model.onnx from "
                                                    "`rosafx export RUN`")],
             data: Annotated[Path, typer.Option(help="Data to score, read as the run read its training data")],
             max_new_tokens: Annotated[Optional[int], typer.Option(
                 help="causal-lm RUN: generate greedy answers (KV cache, stop at EOS) of at most N tokens and report "
                      "exact match")] = None,
             extract: Annotated[Optional[str], typer.Option(
                 help=f"What exact match compares: a preset ({', '.join(PRESETS)}) or a regular expression (its "
                      f"first group); default none (the whole response). Implies --max-new-tokens "
                      f"{DEFAULT_NEW_TOKENS} unless given")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False) -> None:
    """Score a trained run or its ONNX export on DATA with the task's metrics (causal-lm: perplexity on the
    response tokens; exact match of greedy answers with --max-new-tokens / --extract)."""
    result = evaluate_path(target, data, max_new_tokens=max_new_tokens, extract=extract)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for key, value in result.items():
        typer.echo(f"{key:<16} {value:.4f}" if isinstance(value, float) else f"{key:<16} {value}")
