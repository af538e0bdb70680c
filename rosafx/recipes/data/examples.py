"""Rows -> examples of a task: which columns hold the text, the pair and the label, and
the label names (from the training data; evaluation data is mapped with them)."""
from __future__ import annotations

import dataclasses

from rosafx.errors import RosafxError
from rosafx.recipes.data.tables import TEXT, Table

TASKS = ("classification", "regression", "causal-lm")


@dataclasses.dataclass
class Examples:
    task: str
    texts: list[str]
    pairs: list[str] | None
    labels: list | None               # class ids (classification), floats (regression), None (causal-lm)
    label_names: list[str] | None     # class id -> name (classification)
    columns: dict                     # {"text": ..., "pair": ..., "label": ...} as used

    def __len__(self) -> int:
        return len(self.texts)


def examples_from(table: Table, task: str | None = None, *, text_column: str | None = None,
                  pair_column: str | None = None, label_column: str | None = None,
                  label_names: list[str] | None = None) -> Examples:
    """``label_names``: the training run's classes, for evaluation data (an unseen label is an error)."""
    layout = table.layout
    task = task or (layout.task if layout else "classification")
    if task not in TASKS:
        raise RosafxError(f"Unknown task '{task}': use one of {TASKS}.")
    if task == "causal-lm":
        text_column = text_column or (TEXT if TEXT in table.columns else None)
        if text_column is None:
            raise RosafxError(f"{table.path}: causal-lm reads a 'text' column (or name one with --text-column). "
                              f"Columns found: {table.columns}.")
        return Examples(task, _strings(table, text_column), None, None, None, {"text": text_column})
    text_column = text_column or (layout.text if layout else None)
    label_column = label_column or (layout.label if layout else None)
    if pair_column is None and layout is not None and text_column == layout.text:
        pair_column = layout.pair
    if text_column is None or label_column is None:
        raise RosafxError(f"{table.path}: name the columns with --text-column and --label-column (and "
                          f"--pair-column for sentence pairs). Columns found: {table.columns}.")
    texts = _strings(table, text_column)
    pairs = _strings(table, pair_column) if pair_column else None
    raw = table.column(label_column)
    columns = {"text": text_column, "pair": pair_column, "label": label_column}
    if task == "regression":
        return Examples(task, texts, pairs, _floats(table, label_column, raw), None, columns)
    names = label_names if label_names is not None else class_names(raw)
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for line, value in zip(table.lines, raw):
        key = _label_key(value)
        if key not in index:
            where = "the training labels" if label_names is not None else "the labels"
            raise RosafxError(f"{table.path}, line {line}: label '{key}' is not among {where} {names}. "
                              "Evaluation data must use the classes the model was trained on.")
        labels.append(index[key])
    return Examples(task, texts, pairs, labels, list(names), columns)


def class_names(raw: list) -> list[str]:
    """Distinct labels, numeric ones in numeric order (so "0", "1" are classes 0, 1)."""
    keys = sorted({_label_key(v) for v in raw})
    try:
        return sorted(keys, key=float)
    except ValueError:
        return keys


def _label_key(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _strings(table: Table, name: str) -> list[str]:
    values = table.column(name)
    for line, value in zip(table.lines, values):
        if not isinstance(value, str):
            raise RosafxError(f"{table.path}, line {line}: column '{name}' holds {value!r}, not text.")
    return values


def _floats(table: Table, name: str, raw: list) -> list[float]:
    out = []
    for line, value in zip(table.lines, raw):
        try:
            out.append(float(value))
        except (TypeError, ValueError):
            raise RosafxError(f"{table.path}, line {line}: regression needs a number in '{name}', got {value!r}.") from None
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
                                   labels=take(examples.labels))
    return pick(order[:cut]), pick(order[cut:])
