"""The training options, once: each one's name, type, bounds, ``rosafx.fit``'s default and help.

``rosafx.fit`` checks its keyword arguments against ``TRAINING_OPTIONS`` (one validation path:
``checked``), and its signature holds the same names and defaults (tests/test_fit_options.py
says so). The recipe's table (rosafx/recipes/options.py: ``rosafx train``'s flags, ``--config``
and ``run.json``) takes these entries as they are, or with its own default and help
(``dataclasses.replace``), and adds the recipe's own keys (model, data, method, ...).
``compile`` is not here: fit also takes a backend name or a callable, which no option kind
describes; the recipe has it as a bool.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosafx.errors import RosafxError
from rosafx.training.optim import SCHEDULES

KINDS = ("path", "text", "texts", "int", "float", "bool", "choice", "bool-or-choice")
TEXT_LIMIT = 4096        # characters in one text value (a path, a pattern, a column name)
LIST_LIMIT = 1024        # items in one list value (--target, --option)
BIG = 1 << 20            # a bound far above any real batch, length or rank, far below overflow


@dataclass(frozen=True)
class Option:
    name: str
    kind: str                          # one of KINDS
    default: Any
    help: str
    low: float | None = None           # numbers: the smallest value allowed
    high: float | None = None          # numbers: the largest value allowed
    low_open: bool = False             # low itself is not allowed
    high_open: bool = False            # high itself is not allowed
    choices: tuple = ()                # "choice" and "bool-or-choice"
    has_flag: bool = True              # False: only in a --config file or run.json

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, where: str | None = None) -> Any:
        """``value`` as the run uses it (an int where a float is expected becomes a float, a
        path a string), or a RosafxError. ``where``: the file the value came from (None:
        the command line)."""
        if value is None:
            return None
        label = self.flag if where is None else f"{where}: {self.name}"
        if isinstance(value, Path) and self.kind == "path":
            value = str(value)
        expected = self._type_error(value)
        if expected:
            raise RosafxError(f"{label} must be {expected}, got {_shown(value)}.")
        if self.kind == "float":
            value = float(value)
            if not math.isfinite(value):
                raise RosafxError(f"{label} must be a finite number{self._range()}, got {_shown(value)}.")
        if self.kind in ("int", "float") and not self._in_range(value):
            what = "an integer" if self.kind == "int" else "a finite number"
            raise RosafxError(f"{label} must be {what}{self._range()}, got {_shown(value)}.")
        return list(value) if self.kind == "texts" else value

    def _type_error(self, value: Any) -> str | None:
        """What the value should have been, or None when its type fits."""
        text = isinstance(value, str) and 0 < len(value) <= TEXT_LIMIT
        if self.kind in ("path", "text"):
            return None if text else f"a text of 1 to {TEXT_LIMIT} characters"
        if self.kind == "texts":
            ok = (isinstance(value, (list, tuple)) and len(value) <= LIST_LIMIT
                  and all(isinstance(v, str) and 0 < len(v) <= TEXT_LIMIT for v in value))
            return None if ok else f"a list of up to {LIST_LIMIT} texts of 1 to {TEXT_LIMIT} characters ([a, b])"
        if self.kind == "int":
            return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
        if self.kind == "float":
            return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
        if self.kind == "bool":
            return None if isinstance(value, bool) else "true or false"
        allowed = self.choices + ((True, False) if self.kind == "bool-or-choice" else ())
        ok = any(value == c and type(value) is type(c) for c in allowed)
        return None if ok else "one of " + ", ".join(_shown(c) for c in allowed)

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def _range(self) -> str:
        if self.low is None and self.high is None:
            return ""
        low = "" if self.low is None else f"{'(' if self.low_open else '['}{_number(self.low)}"
        high = "" if self.high is None else f"{_number(self.high)}{')' if self.high_open else ']'}"
        return f" in {low or '(-inf'}, {high or 'inf)'}"


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


PRECISIONS = ("fp32", "bf16")              # what rosafx.fit's autocast takes
CHECKPOINT_MODES = ("full", "attention")   # rosafx.training.activation_checkpointing's modes

TRAINING_TABLE = (
    Option("steps", "int", None, "Optimizer steps (instead of epochs)", low=1, high=1e12),
    Option("epochs", "float", None, "Passes over the data", low=0, high=1e6, low_open=True),
    Option("lr", "float", 1e-3, "Peak learning rate", low=0, high=10, low_open=True),
    Option("weight_decay", "float", 0.0, "AdamW weight decay", low=0, high=10),
    Option("schedule", "choice", "linear", "linear | cosine | constant", choices=SCHEDULES),
    Option("warmup_ratio", "float", 0.0, "Fraction of steps of linear warm-up", low=0, high=1, high_open=True),
    Option("grad_accum", "int", 1, "Batches per optimizer step", low=1, high=BIG),
    Option("max_grad_norm", "float", None, "Clip the gradients' norm to this (0 or none: no clipping)", low=0,
           high=1e12),
    Option("precision", "choice", "fp32", "fp32 | bf16 (autocast)", choices=PRECISIONS),
    Option("eval_every", "int", None, "Evaluate every N steps (and at the end)", low=1, high=1e12),
    Option("save_every", "int", None, "Checkpoint every N steps (and at the end)", low=1, high=1e12),
    Option("best_metric", "text", None, "Keep the best evaluation by this metric"),
    Option("calibration_batches", "int", 8, "Batches a method's calibration reads", low=1, high=BIG),
    Option("seed", "int", None, "Seed for torch and random before training", low=0, high=2**32 - 1),
    Option("grad_checkpoint", "bool-or-choice", False, "Recompute each layer's activations in the backward "
           "(less memory, more time; or a mode: full, attention)", choices=CHECKPOINT_MODES),
    Option("log_every", "int", None, "Steps between loss reads (default 1 eager, 10 compiled)", low=1, high=BIG),
    Option("max_length", "int", None, "compile: the longest padded length of a dict batch", low=1, high=BIG),
)
TRAINING_OPTIONS: dict[str, Option] = {option.name: option for option in TRAINING_TABLE}


def checked(values: dict, options: dict[str, Option], where: str | None = None) -> dict:
    """Every value checked against its option in ``options``; an unknown key is an error.
    ``where``: where the values came from (None: the command line)."""
    if not isinstance(values, dict):
        raise RosafxError(f"{where or 'the options'} must map option names to values, got {_shown(values)}.")
    unknown = sorted(repr(k) if not isinstance(k, str) else k for k in values if k not in options)
    if unknown:
        source = "the command line" if where is None else where
        raise RosafxError(f"{source}: unknown option(s) {unknown[:8]}. Known: {sorted(options)}.")
    return {key: options[key].check(value, where) for key, value in values.items()}
