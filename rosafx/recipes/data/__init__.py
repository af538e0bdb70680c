"""Data for ``rosafx train``/``evaluate`` and ``rosafx.fit``: read a file (GLUE TSV layouts,
CSV, JSON Lines, text), pick the task's columns, tokenise once, batch, score.

    table = read_table("train.tsv")                     # columns, rows, a recognised layout
    examples = examples_from(table, "classification")   # texts, pairs, labels, label names
    batches = Batches(encode(examples, tokenizer, 128, cache_dir), 32, shuffle=True, seed=0)
    rosafx.fit(adapted, batches, loss_for("classification"), metrics=TaskMetrics("classification"), ...)
"""
from rosafx.recipes.data.batches import Batches, model_inputs
from rosafx.recipes.data.examples import TASKS, Examples, examples_from
from rosafx.recipes.data.metrics import TaskMetrics, best_metric_of, scores
from rosafx.recipes.data.objectives import logits_of, loss_for
from rosafx.recipes.data.tables import LAYOUTS, Table, read_table
from rosafx.recipes.data.tokens import Encoded, encode

SAMPLES = __path__[0] + "/samples"

__all__ = ["Batches", "model_inputs", "TASKS", "Examples", "examples_from", "TaskMetrics", "best_metric_of", "scores",
           "logits_of", "loss_for", "LAYOUTS", "Table", "read_table", "Encoded", "encode", "SAMPLES"]
