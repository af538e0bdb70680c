"""Answer extractors for exact match: what part of a generated (and of the reference) response
is compared. A preset by name, or a user's regular expression (``--extract REGEX``: its first
group, or the whole match when it has none), matched with a time budget (the ``regex``
engine, as rosafx/graph/safe_regex.py does for rule keys).

    gsm8k   the number after the last "####", commas stripped ("#### 1,234" -> "1234")
    last-number   the last number in the text, commas stripped
    none    the whole response, surrounding whitespace stripped

A generated response with nothing to extract gives None and is a miss; a reference with nothing to
extract is an error (the extractor does not fit the data).
"""
from __future__ import annotations

import functools
from typing import Callable

import regex

from rosafx.errors import RosafxError

NUMBER = r"-?[\d,]*\.?\d+"
MATCH_TIMEOUT_S = 0.5   # per response: a pathological user pattern is an error, never a hang


def _number(text: str | None) -> str | None:
    return None if text is None else text.replace(",", "").strip()


def _last(pattern: str, text: str) -> str | None:
    found = regex.findall(pattern, text, timeout=MATCH_TIMEOUT_S)
    return found[-1] if found else None


PRESETS: dict[str, Callable[[str], str | None]] = {
    "gsm8k": lambda text: _number(_last(r"####\s*(" + NUMBER + ")", text)),
    "last-number": lambda text: _number(_last(NUMBER, text)),
    "none": lambda text: text.strip(),
}


def extractor(spec: str | None) -> Callable[[str], str | None]:
    """A preset by name (``None`` is ``none``), otherwise ``spec`` as a regular expression."""
    if spec is None:
        return PRESETS["none"]
    if spec in PRESETS:
        return PRESETS[spec]
    try:
        pattern = regex.compile(spec, flags=regex.VERSION0)
    except (regex.error, OverflowError, RecursionError, ValueError) as exc:
        raise RosafxError(f"--extract {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a valid regular "
                          f"expression ({exc}).") from None
    return functools.partial(_by_pattern, pattern, spec)


def _by_pattern(pattern, spec: str, text: str) -> str | None:
    try:
        match = pattern.search(text, timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        raise RosafxError(f"--extract {spec!r} took longer than {MATCH_TIMEOUT_S} s on one response: simplify the "
                          "pattern (nested repetition such as (a+)+ backtracks without end).") from None
    if match is None:
        return None
    return (match.group(1) if pattern.groups else match.group(0)).strip()


def exact_match(predictions: list[str], references: list[str], extract: Callable[[str], str | None]) -> float:
    """The fraction of predictions whose extracted answer equals the reference's."""
    if not references:
        raise RosafxError("No rows to score for exact match.")
    hits = 0
    for row, (prediction, reference) in enumerate(zip(predictions, references), 1):
        wanted = extract(reference)
        if wanted is None:
            raise RosafxError(f"Row {row}'s reference response has no answer the extractor finds ({reference[-60:]!r}): "
                              "choose the --extract preset or pattern that fits the data.")
        hits += extract(prediction) == wanted
    return hits / len(references)
