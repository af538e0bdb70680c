"""Rule keys and the one matcher every selection goes through (sites, ``full`` modules, HF
PEFT's ``target_modules`` and patterns).

Each key has one kind; from weakest to strongest (the strongest match wins; within one
kind the first listed wins), as in torch.ao's QConfigMapping:

    kind      written as                               selects a module path p when
    TYPE      a class (``nn.Linear``) or "type:Conv1D"  p's module class has that name
    REGEX     "re:PATTERN", or text with any of *+?[](){}|^$\\   PATTERN fully matches p
    SUFFIX    plain text such as "query", "self.query"  p == text or p ends with "." + text
    EXACT     "path:encoder.layer.0.attention.self.query"      p == text

Plain dotted text is a SUFFIX (its dots are dots, not regex wildcards); among SUFFIX keys a
key that is the whole path outranks one that is a proper suffix of it, so a full path
written plainly still beats "query". Saved adapters and HF PEFT interop build EXACT keys
directly. A value of ``None`` excludes what the key selects.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from rosafx.graph import safe_regex
from rosafx.errors import RosafxError
from rosafx.graph.sites import Site


class Kind(IntEnum):
    TYPE = 1
    REGEX = 2
    SUFFIX = 3
    EXACT = 4


PREFIXES = {"type:": Kind.TYPE, "re:": Kind.REGEX, "suffix:": Kind.SUFFIX, "path:": Kind.EXACT}
REGEX_CHARS = frozenset("*+?[](){}|^$\\")


@dataclass(frozen=True)
class Key:
    kind: Kind
    text: str

    def strength(self, path: str, module_type: str = "") -> tuple[int, int]:
        """How strongly this key selects ``path`` ((0, 0): not at all); larger wins."""
        if self.kind is Kind.TYPE:
            return (Kind.TYPE, 0) if module_type and module_type.split(".")[-1] == self.text.split(".")[-1] \
                else (0, 0)
        if self.kind is Kind.REGEX:
            return (Kind.REGEX, 0) if safe_regex.fullmatch(self.text, path, source="rule pattern") else (0, 0)
        if self.kind is Kind.SUFFIX:
            if path == self.text:
                return (Kind.SUFFIX, 1)
            return (Kind.SUFFIX, 0) if path.endswith("." + self.text) else (0, 0)
        return (Kind.EXACT, 0) if path == self.text else (0, 0)

    def selects(self, path: str, module_type: str = "") -> bool:
        return self.strength(path, module_type) > (0, 0)

    def __str__(self) -> str:
        return f"{self.kind.name.lower()}:{self.text}"


def parse_key(key: Any) -> Key:
    """A rule key as the user wrote it -> its one kind (see the module docstring)."""
    if isinstance(key, Key):
        return key
    if isinstance(key, type):
        return Key(Kind.TYPE, key.__qualname__)
    if not isinstance(key, str):
        raise RosafxError(f"A rule key must be a module path, a regular expression or a module class, got {key!r}.")
    for prefix, kind in PREFIXES.items():
        if key.startswith(prefix):
            return Key(kind, key[len(prefix):])
    return Key(Kind.REGEX if REGEX_CHARS & set(key) else Kind.SUFFIX, key)


def best_match(keys: list[tuple[Key, Any]], path: str, module_type: str = "") -> tuple[Key, Any] | None:
    """The (key, value) that selects ``path`` most strongly; the first listed among equals."""
    best, best_strength = None, (0, 0)
    for key, value in keys:
        strength = key.strength(path, module_type)
        if strength > best_strength:
            best, best_strength = (key, value), strength
    return best


def parsed_rules(rules: dict) -> list[tuple[Key, Any]]:
    if not isinstance(rules, dict) or not rules:
        raise RosafxError("rules must be a non-empty dict such as {'query': {'method': 'lora', 'rank': 8}}.")
    return [(parse_key(k), v) for k, v in rules.items()]


def resolve(rules: dict | list[tuple[Key, Any]], sites: list[Site]) -> dict[str, Any]:
    """Map each selected site path to its rule value (``None`` excluded). ``rules``: a rules
    dict, or its keys already parsed (``Plan.from_rules`` parses the values first)."""
    keys = rules if isinstance(rules, list) else parsed_rules(rules)
    chosen: dict[str, Any] = {}
    for site in sites:
        found = best_match(keys, site.path, site.module_type)
        if found is not None and found[1] is not None:
            chosen[site.path] = found[1]
    return chosen


def nearest_paths(keys: list[Any], paths: list[str], n: int = 5) -> list[str]:
    near: list[str] = []
    for key in keys:
        text = parse_key(key).text if isinstance(key, (str, Key)) else None
        if text is not None:
            short = {p.split(".")[-1] for p in paths}
            near += difflib.get_close_matches(text, paths, n=n, cutoff=0.3)
            near += difflib.get_close_matches(text, sorted(short), n=n, cutoff=0.3)
    seen = list(dict.fromkeys(near)) or paths[:n]
    return seen[:n]


def no_match_error(rules: dict, sites: list[Site]) -> RosafxError:
    if not sites:
        return RosafxError("The model has no linear sites (nn.Linear, F.linear, Conv1D) to adapt.")
    near = ", ".join(nearest_paths(list(rules), [s.path for s in sites]))
    return RosafxError(
        f"The rules {list(map(str, rules))} match no linear site. Nearest site paths: {near}. "
        "Run `rosafx inspect MODEL` to list every site.")
