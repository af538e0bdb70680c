"""How the rule flags every command shares (--method, --target, --rank, --alpha, -O, --rules) become
rules: ``rosafx adapt``, ``rosafx inspect`` and ``rosafx train`` (its ``run.json``) read them alike."""
from __future__ import annotations

import json
import math
from pathlib import Path

from rosafx.errors import RosafxError
from rosafx.io.reading import SMALL_FILE_LIMIT, read_json
from rosafx.recipes.options import OPTIONS

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
        rules = read_json(rules_file, 'rules: a JSON object {"pattern": {"method": "lora", "rank": 8}}',
                          limit=SMALL_FILE_LIMIT)
        if not rules:
            raise RosafxError(f"{rules_file} holds no rules; add {{\"pattern\": {{\"method\": \"lora\"}}}}.")
        return rules
    if method is None:
        raise RosafxError("Say which adapter to insert: --method lora (see `rosafx methods`) or --rules FILE.")
    config: dict = {"method": method}
    if rank is not None:  # the one check of --rank and --alpha, for adapt, inspect and train alike
        config["rank"] = OPTIONS["rank"].check(rank)
    if alpha is not None:
        config["alpha"] = OPTIONS["alpha"].check(alpha)
    for item in options or []:
        if "=" not in item:
            raise RosafxError(f"--option takes KEY=VALUE, got '{item}'.")
        key, value = item.split("=", 1)
        config[key.strip()] = _parse_value(value.strip())
    return {target: config for target in (targets or [DEFAULT_TARGET])}
