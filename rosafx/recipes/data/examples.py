"""Rows -> examples of a task: which columns hold the text, the pair and the label, and
the label names (from the training data; evaluation data is mapped with them)."""
from __future__ import annotations

import dataclasses
import json
import math
import re

from rosafx.errors import RosafxError
from rosafx.recipes.data.instructions import instruction_rows
from rosafx.recipes.data.tables import TEXT, Table, strings

TASKS = ("classification", "regression", "causal-lm")


@dataclasses.dataclass
class Examples:
    task: str
    texts: list[str]
    pairs: list[str] | None
    labels: list | None               # class ids (classification), floats (regression), None (causal-lm)
    label_names: list[str] | None     # class id -> name (classification)
    columns: dict                     # {"text": ..., "pair": ..., "label": ...} as used
    # causal-lm instruction rows (rosafx/recipes/data/instructions.py): texts are the prompts and
    # responses their answers; chat rows keep their messages (rendered with the tokenizer when
    # encoded) and texts are "" for them
    responses: list[str] | None = None
    messages: list[list[dict]] | None = None

    def __len__(self) -> int:
        return len(self.texts)


def examples_from(table: Table, task: str | None = None, *, text_column: str | None = None,
                  pair_column: str | None = None, label_column: str | None = None,
                  label_names: list[str] | None = None, prompt_column: str | None = None,
                  response_column: str | None = None, messages_column: str | None = None) -> Examples:
    """``label_names``: the training run's classes, for evaluation data (an unseen label is an error).
    causal-lm reads plain text, prompt + response rows or chat rows (``instructions.py``)."""
    layout = table.layout
    task = task or (layout.task if layout else "classification")
    if task not in TASKS:
        raise RosafxError(f"Unknown task '{task}': use one of {TASKS}.")
    if task == "causal-lm":
        rows = instruction_rows(table, text_column, prompt_column, response_column, messages_column)
        if rows is not None:
            return Examples(task, rows.prompts, None, None, None, rows.columns, responses=rows.responses,
                            messages=rows.messages)
        text_column = text_column or (TEXT if TEXT in table.columns else None)
        if text_column is None:
            raise RosafxError(f"{table.path}: causal-lm reads a 'text' column (or name one with --text-column), "
                              "prompt and response columns (--prompt-column, --response-column) or chat rows "
                              f"(--messages-column). Columns found: {table.columns}.")
        return Examples(task, strings(table, text_column), None, None, None, {"text": text_column})
    text_column = text_column or (layout.text if layout else None)
    label_column = label_column or (layout.label if layout else None)
    if pair_column is None and layout is not None and text_column == layout.text:
        pair_column = layout.pair
    if text_column is None or label_column is None:
        raise RosafxError(f"{table.path}: name the columns with --text-column and --label-column (and "
                          f"--pair-column for sentence pairs). Columns found: {table.columns}.")
    texts = strings(table, text_column)
    pairs = strings(table, pair_column) if pair_column else None
    raw = table.column(label_column)
    columns = {"text": text_column, "pair": pair_column, "label": label_column}
    if task == "regression":
        return Examples(task, texts, pairs, _scores(table, label_column, raw), None, columns)
    keys = _classes_of(table, label_column, raw)
    if label_names is None:
        names = class_names(keys)
        if len(names) < 2:
            raise RosafxError(f"{table.path}: every row has the label '{names[0]}' in column '{label_column}'; "
                              "classification needs at least two classes. Check --label-column, or use "
                              "--task regression for scores.")
    else:
        names = list(label_names)
    index = {_name_key(name): i for i, name in enumerate(names)}
    labels = []
    for line, key in zip(table.lines, keys):
        if key not in index:
            where = "the training labels" if label_names is not None else "the labels"
            raise RosafxError(f"{table.path}, line {line}: label '{key}' is not among {where} {names}. "
                              "Evaluation data must use the classes the model was trained on.")
        labels.append(index[key])
    return Examples(task, texts, pairs, labels, names, columns)


def class_names(keys: list[str]) -> list[str]:
    """Distinct (normalised) labels, numeric ones in numeric order (so "0", "1" are classes 0, 1)."""
    keys = sorted(set(keys))
    try:
        return sorted(keys, key=float)
    except ValueError:
        return keys


# A number as a data file writes it: "1", "-2", "1.0", ".5", "1e3" (not "1_000", "inf" or "nan", which
# float() would also take).
NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
NOT_A_NUMBER = ("nan", "+nan", "-nan")  # a float NaN written as text (str(), numpy, pandas .astype(str))


def _label_key(value) -> str:
    """The class a label names, so that equal labels are one class: numbers compare as numbers
    ("1", "1.0", " 1", 1 and 1.0 are class "1"), text is stripped. ValueError for no label:
    missing, null, empty, NaN, or a JSON list/object."""
    if value is None:
        raise ValueError("no label (missing or null)")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("an empty label")
        if text.lower() in NOT_A_NUMBER:
            raise ValueError(f"the label {text!r} (not a number: a missing value?)")
        if not NUMBER.fullmatch(text):
            return text
        value = float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"the label {value} (not a finite number)")
        return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else repr(value)
    raise ValueError(f"{type(value).__name__} {json.dumps(value)[:40]} where a label is expected")


def _name_key(name: str) -> str:
    """A training run's class name as a key (runs written before labels were normalised may hold "1.0")."""
    try:
        return _label_key(name)
    except ValueError:
        return name


def _classes_of(table: Table, column: str, raw: list) -> list[str]:
    """Each row's class; a file holds few distinct labels, so each is parsed once."""
    keys, parsed = [], {}
    for line, value in zip(table.lines, raw):
        seen = (type(value), value) if isinstance(value, (str, int, float)) else None  # 1, 1.0, True hash alike
        key = parsed.get(seen) if seen is not None else None
        if key is None:
            try:
                key = _label_key(value)
            except ValueError as exc:
                raise RosafxError(f"{table.path}, line {line}: {exc} in column '{column}'. Give every row a "
                                  "label, or remove the row.") from None
            if seen is not None:
                parsed[seen] = key
        keys.append(key)
    return keys


def _scores(table: Table, name: str, raw: list) -> list[float]:
    """Regression targets: finite numbers (a number in text, or a JSON number); no bool, NaN or inf."""
    out = []
    for line, value in zip(table.lines, raw):
        number = None
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            number = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is None or not math.isfinite(number):
            what = "no score (missing or null)" if value is None else f"{value!r}"
            raise RosafxError(f"{table.path}, line {line}: regression needs a number in '{name}', got {what}. "
                              "Give every row a finite score, or remove the row.")
        out.append(number)
    return out


def held_apart(examples: Examples, fraction: float, seed: int = 0) -> tuple[Examples, Examples]:
    """(rest, a random ``fraction`` held apart for validation), reproducible from ``seed``."""
    import random
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    cut = len(order) - int(len(order) * fraction)

    def pick(index):
        take = lambda values: None if values is None else [values[i] for i in index]  # noqa: E731
        return dataclasses.replace(examples, texts=take(examples.texts), pairs=take(examples.pairs),
                                   labels=take(examples.labels), responses=take(examples.responses),
                                   messages=take(examples.messages))
    return pick(order[:cut]), pick(order[cut:])
