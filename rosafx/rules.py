"""Rules: which site gets which adapter config.

Keys of a rules dict, from weakest to strongest (the strongest match wins; within one
kind the first listed wins), as in torch.ao's QConfigMapping:

    1. a module type (a class such as ``nn.Linear`` or ``"type:Linear"``)
    2. a regular expression that fully matches the site path (HF PEFT ``target_modules``)
    3. a dot-suffix of the path (``"query"`` matches ``encoder.layer.0.attention.self.query``)
    4. the exact path

A value of ``None`` excludes the matched sites. A value is a config dict such as
``{"method": "lora", "rank": 8}`` or a method config object.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from . import safe_regex
from .errors import RosafxError
from .sites import Site

EXACT, SUFFIX, REGEX, TYPE = 4, 3, 2, 1
MATCH_KIND_NAMES = {EXACT: "exact path", SUFFIX: "dot-suffix", REGEX: "regular expression", TYPE: "module type"}


@dataclass
class Rule:
    key: Any
    config: Any  # None excludes


def _type_name(key: Any) -> str | None:
    if isinstance(key, type):
        return key.__qualname__
    if isinstance(key, str) and key.startswith("type:"):
        return key[len("type:"):]
    return None


def match_strength(key: Any, site: Site) -> int:
    """How strongly ``key`` selects ``site`` (0: not at all)."""
    type_name = _type_name(key)
    if type_name is not None:
        return TYPE if site.module_type.split(".")[-1] == type_name.split(".")[-1] else 0
    if not isinstance(key, str):
        raise RosafxError(f"A rule key must be a module path, a regular expression or a module class, got {key!r}.")
    if key == site.path:
        return EXACT
    if site.path.endswith("." + key):
        return SUFFIX
    if safe_regex.fullmatch(key, site.path, source="rule pattern"):
        return REGEX
    return 0


def resolve(rules: dict, sites: list[Site]) -> dict[str, Any]:
    """Map each selected site path to its config; error if the rules select nothing."""
    if not isinstance(rules, dict) or not rules:
        raise RosafxError("rules must be a non-empty dict such as {'query': {'method': 'lora', 'rank': 8}}.")
    chosen: dict[str, Any] = {}
    for site in sites:
        best, best_strength = None, 0
        for key, config in rules.items():
            strength = match_strength(key, site)
            if strength > best_strength:
                best, best_strength = Rule(key, config), strength
        if best is not None and best.config is not None:
            chosen[site.path] = best.config
    return chosen


def nearest_paths(keys: list[Any], sites: list[Site], n: int = 5) -> list[str]:
    paths = [s.path for s in sites]
    near: list[str] = []
    for key in keys:
        if isinstance(key, str):
            short = {p.split(".")[-1] for p in paths}
            near += difflib.get_close_matches(key, paths, n=n, cutoff=0.3)
            near += difflib.get_close_matches(key, sorted(short), n=n, cutoff=0.3)
    seen = list(dict.fromkeys(near)) or paths[:n]
    return seen[:n]


def no_match_error(rules: dict, sites: list[Site]) -> RosafxError:
    if not sites:
        return RosafxError("The model has no linear sites (nn.Linear, F.linear, Conv1D) to adapt.")
    near = ", ".join(nearest_paths(list(rules), sites))
    return RosafxError(
        f"The rules {list(map(str, rules))} match no linear site. Nearest site paths: {near}. "
        "Run `rosafx inspect MODEL` to list every site.")
