"""Regular expressions from users and files, matched with a time budget.

Python's ``re`` backtracks without limit: ``([a-z.0-9]+)+X`` against a 40-character module
path runs for minutes. Rule keys and PEFT ``target_modules`` / ``alpha_pattern`` /
``rank_pattern`` come from the command line and from downloaded files, so they are
matched with the ``regex`` engine (``re``-compatible, already a transformers dependency)
under a per-match timeout; a pattern that exceeds it is an error naming the pattern, never
a hang. Paths are short, so a sane pattern needs microseconds and the budget is generous.
"""
from __future__ import annotations

import functools

import regex

from rosafx.errors import RosafxError

MATCH_TIMEOUT_S = 0.25
MAX_PATTERN_LENGTH = 2000


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str):
    """The compiled pattern, or None if it is not a valid regular expression."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise RosafxError(f"Pattern {pattern[:60]!r}... is {len(pattern)} characters long; "
                          f"patterns are limited to {MAX_PATTERN_LENGTH}.")
    try:
        return regex.compile(pattern, flags=regex.VERSION0)
    except (regex.error, OverflowError, RecursionError, ValueError):
        return None


def is_valid(pattern: str) -> bool:
    return _compile(pattern) is not None


def fullmatch(pattern: str, text: str, *, source: str = "pattern") -> bool:
    """Whether ``pattern`` fully matches ``text``; an invalid pattern matches nothing.
    ``source`` names where the pattern came from, for the error message."""
    compiled = _compile(pattern)
    if compiled is None:
        return False
    try:
        return compiled.fullmatch(text, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise RosafxError(f"The {source} {pattern[:120]!r} took over {MATCH_TIMEOUT_S} s to match one module path "
                          f"({text[:80]!r}): it backtracks catastrophically (nested repetition such as "
                          "'(a+)+'). Use a simpler pattern, an exact path or a dot-suffix.") from None
