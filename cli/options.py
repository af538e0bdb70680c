"""Options shared by several commands, and how they become rules."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from rosafx.errors import RosafxError
from rosafx.files import read_json

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

HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler")
DEFAULT_TARGET = r"(?!(?:.*\.)?(?:" + "|".join(HEAD_NAMES) + r")(?:\.|$)).*"


def _parse_value(text: str):
    """A JSON value (number, bool, null, list) or else the text itself; never NaN/Infinity."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    numeric = value if isinstance(value, float) else _float_or_none(text)
    if numeric is not None and not math.isfinite(numeric):
        raise RosafxError(f"--option value '{text}' is not a finite number.")
    return value


def _float_or_none(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def build_rules(method: str | None, targets: list[str] | None, rank: int | None, alpha: float | None,
                options: list[str] | None, rules_file: Path | None) -> dict:
    if rules_file is not None:
        rules = read_json(rules_file, 'rules: a JSON object {"pattern": {"method": "lora", "rank": 8}}')
        if not rules:
            raise RosafxError(f"{rules_file} holds no rules; add {{\"pattern\": {{\"method\": \"lora\"}}}}.")
        return rules
    if method is None:
        raise RosafxError("Say which adapter to insert: --method lora (see `rosafx methods`) or --rules FILE.")
    config: dict = {"method": method}
    if rank is not None:
        config["rank"] = rank
    if alpha is not None:
        config["alpha"] = alpha
    for item in options or []:
        if "=" not in item:
            raise RosafxError(f"--option takes KEY=VALUE, got '{item}'.")
        key, value = item.split("=", 1)
        config[key.strip()] = _parse_value(value.strip())
    return {target: config for target in (targets or [DEFAULT_TARGET])}
