"""The options of ``rosafx train``, once: each one's name, type, default, allowed values and help.

The command line, a ``--config`` file (YAML or JSON) and ``RUN/run.json`` hold the same keys,
and every value from any of them goes through ``checked`` against this table: a string where a
list is expected, ``NaN`` epochs, a zero batch, a learning rate that overflows or a nested
mapping is a one-line error naming the option and where it came from, before anything runs.
``rosafx train``'s flags are made from this table (``cli/options.flag``: type and help), and
``tests/test_faults_config.py`` checks that the command names every option that has a flag.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosafx.errors import RosafxError
from rosafx.methods import methods_with_option
from rosafx.methods.base import MAX_ALPHA
from rosafx.ops.quantized import MAX_GROUP_SIZE, SCHEMES
from rosafx.recipes.data.examples import TASKS
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

TABLE = (
    Option("model", "path", None, "HF model directory, or `rosafx adapt` output"),
    Option("method", "text", None, "Adapter method id (see `rosafx methods`)"),
    Option("target", "texts", None, "Site pattern: exact path, dot-suffix or regex; repeatable. "
           "Default: every linear site except output heads"),
    Option("rank", "int", None, "Adapter rank", low=1, high=BIG),
    Option("alpha", "float", None, f"Scaling numerator ({', '.join(methods_with_option('alpha'))})", low=0,
           high=MAX_ALPHA, low_open=True),
    Option("option", "texts", None, "Extra method option KEY=VALUE (e.g. density=0.01); repeatable"),
    Option("rules", "path", None, "JSON file {pattern: config}; overrides the options above"),
    Option("quantize", "choice", None, "Store the frozen linear weights quantized: nf4 | int4 | int8 (QLoRA: "
           "adapters train on top; modules trained in full stay fp32)", choices=tuple(SCHEMES)),
    Option("quantize_group_size", "int", None, "Weights per quantization scale (default 64; must divide each "
           "layer's columns)", low=2, high=MAX_GROUP_SIZE),
    Option("data", "path", None, "Training data: .tsv (GLUE layouts), .csv, .jsonl, .txt"),
    Option("eval", "path", None, "Evaluation data, same layout"),
    Option("task", "choice", None, "classification | regression | causal-lm (default: from the layout)",
           choices=TASKS),
    Option("text_column", "text", None, "Column with the text"),
    Option("pair_column", "text", None, "Column with the second text of a pair"),
    Option("label_column", "text", None, "Column with the label or score"),
    Option("max_length", "int", 128, "Tokens per example (default 128; at most the model's positions)",
           low=1, high=BIG),
    Option("epochs", "float", None, "Passes over the data", low=0, high=1e6, low_open=True),
    Option("max_steps", "int", None, "Optimizer steps (instead of --epochs)", low=1, high=1e12),
    Option("batch_size", "int", 32, "Examples per batch and process (default 32)", low=1, high=BIG),
    Option("grad_accum", "int", 1, "Batches per optimizer step (default 1)", low=1, high=BIG),
    Option("lr", "float", 5e-4, "Peak learning rate (default 5e-4)", low=0, high=10, low_open=True),
    Option("warmup_ratio", "float", 0.0, "Fraction of steps of linear warm-up", low=0, high=1, high_open=True),
    Option("schedule", "choice", "linear", "linear | cosine | constant", choices=SCHEDULES),
    Option("weight_decay", "float", 0.0, "AdamW weight decay", low=0, high=10),
    Option("eval_every", "int", None, "Evaluate every N steps (and at the end)", low=1, high=1e12),
    Option("save_every", "int", None, "Checkpoint every N steps (and at the end)", low=1, high=1e12),
    Option("seed", "int", 0, "Seed for the head, adapters, shuffling, dropout", low=0, high=2**32 - 1),
    Option("precision", "choice", "fp32", "fp32 | bf16 (autocast)", choices=PRECISIONS),
    Option("best_metric", "text", None, "Keep RUN/best by this metric (default: the task's)"),
    Option("calibration_batches", "int", 8, "Batches a method's calibration reads (see `rosafx methods`)",
           low=1, high=BIG, has_flag=False),
    Option("compile", "bool", False, "Train through a compiled step without host syncs: batches padded to "
           "power-of-two lengths, CUDA graphs on a GPU (compile time reported apart; on a CPU leave it off)"),
    Option("grad_checkpoint", "bool-or-choice", False, "Recompute each layer's activations in the backward "
           "(less memory, more time; a --config file may name the mode: full, attention)",
           choices=CHECKPOINT_MODES),
    Option("device", "text", "auto", "auto | cpu | cuda | cuda:N (default auto: a GPU when there is one, "
           "its adapter ops on the Triton kernels)"),
)
OPTIONS: dict[str, Option] = {option.name: option for option in TABLE}
DEFAULTS: dict[str, Any] = {option.name: option.default for option in TABLE}


def checked(values: dict, where: str | None = None) -> dict:
    """Every value checked against its option; an unknown key is an error. ``where``: the
    file the values came from (None: the command line)."""
    if not isinstance(values, dict):
        raise RosafxError(f"{where or 'the options'} must map option names to values, got {_shown(values)}.")
    unknown = sorted(repr(k) if not isinstance(k, str) else k for k in values if k not in OPTIONS)
    if unknown:
        source = "the command line" if where is None else where
        raise RosafxError(f"{source}: unknown option(s) {unknown[:8]}. Known: {sorted(OPTIONS)}.")
    return {key: OPTIONS[key].check(value, where) for key, value in values.items()}
