"""Evaluation metrics per task, over logits and labels (from the adapted model or from
onnxruntime alike): accuracy, F1 (binary, class 1 positive), Matthews correlation,
Pearson/Spearman (regression), perplexity (causal-lm), and the evaluation loss."""
from __future__ import annotations

import math

import torch

from rosafx.errors import RosafxError
from rosafx.recipes.data.chunked_loss import next_token_nll
from rosafx.recipes.data.objectives import LOSSES, logits_of


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).double().mean())


def f1_binary(pred: torch.Tensor, labels: torch.Tensor) -> float:
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels != 1)).sum())
    fn = int(((pred != 1) & (labels == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class MCC (Gorodkin 2004): (c·s − Σ t_k·p_k) / √((s² − Σ p_k²)(s² − Σ t_k²))."""
    n = int(max(pred.max(), labels.max())) + 1
    confusion = torch.bincount(labels * n + pred, minlength=n * n).reshape(n, n).double()
    t, p, c, s = confusion.sum(1), confusion.sum(0), confusion.trace(), confusion.sum()
    denominator = math.sqrt(float((s * s - (p * p).sum()) * (s * s - (t * t).sum())))
    return float((c * s - (t * p).sum()) / denominator) if denominator else 0.0


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator else 0.0


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks from 1, ties sharing their average rank."""
    order = torch.argsort(x, stable=True)
    ranked = torch.empty(len(x), dtype=torch.float64)
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranked[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranked


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(ranks(x), ranks(y))


def scores(task: str, logits: list[torch.Tensor], labels: list[torch.Tensor], classes: int | None = None) -> dict:
    """Every metric of ``task`` over per-batch logits and labels; ``classes``: the logit
    width a classifier must have (the run's labels). Outputs that cannot be scored (NaN, inf,
    the wrong shape) are an error, never a metric."""
    check_outputs(task, logits, labels, classes)
    if task == "causal-lm":
        sums = [next_token_nll(lg, lb) for lg, lb in zip(logits, labels)]
        return perplexity_scores(sum(float(s) for s, _ in sums), sum(int(c) for _, c in sums))
    losses = [float(LOSSES[task](lg, lb)) * len(lb) for lg, lb in zip(logits, labels)]
    label = torch.cat(labels)
    out = {"loss": sum(losses) / len(label)}
    if task == "regression":
        pred = torch.cat([lg.float().reshape(-1) for lg in logits])
        return {**out, "pearson": pearson(pred, label), "spearman": spearman(pred, label)}
    pred = torch.cat([lg.argmax(-1) for lg in logits])
    out.update(accuracy=accuracy(pred, label), matthews=matthews(pred, label))
    if logits[0].shape[-1] == 2:
        out["f1"] = f1_binary(pred, label)
    return out


def perplexity_scores(total: float, count: int) -> dict:
    """Mean NLL and perplexity over the labelled next tokens (the responses, for instruction data)."""
    if not count:
        raise RosafxError("The evaluation data has no token to predict (texts of one token?).")
    return {"loss": total / count, "perplexity": math.exp(min(total / count, 700.0))}


def check_outputs(task: str, logits: list[torch.Tensor], labels: list[torch.Tensor], classes: int | None) -> None:
    for lg, lb in zip(logits, labels):
        fits = {"classification": lg.dim() == 2, "causal-lm": lg.dim() == 3,
                "regression": lg.dim() == 1 or (lg.dim() == 2 and lg.shape[-1] == 1)}[task]
        if not fits or lg.shape[0] != lb.shape[0]:
            shape = {"classification": "(batch, classes)", "regression": "(batch, 1)",
                     "causal-lm": "(batch, tokens, vocabulary)"}[task]
            raise RosafxError(f"The model's output has shape {tuple(lg.shape)} for a batch of {lb.shape[0]}; "
                              f"{task} needs {shape}. Is it the model trained on this task?")
        if task == "classification" and classes is not None and lg.shape[-1] != classes:
            raise RosafxError(f"The model gives {lg.shape[-1]} logits per example, but the run has {classes} "
                              "classes: it was not exported from this run. Export the run again.")
        if task == "classification" and len(lb) and int(lb.max()) >= lg.shape[-1]:
            raise RosafxError(f"The model gives {lg.shape[-1]} logits per example, fewer than the labels' "
                              f"{int(lb.max()) + 1} classes.")
        if not torch.isfinite(lg).all():
            bad = int((~torch.isfinite(lg)).sum())
            raise RosafxError(f"The model's outputs hold NaN or inf ({bad} of {lg.numel()} values in a batch): its "
                              "adapter or head tensors are not finite (damaged, or training diverged). Nothing "
                              "was scored.")


class TaskMetrics:
    """``metrics(model, batches)`` for ``rosafx.fit``/``rosafx.evaluate``: one pass, every metric."""

    def __init__(self, task: str):
        self.task = task

    def __call__(self, model, batches) -> dict:
        if self.task == "causal-lm":
            return self.causal_lm(model, batches)
        logits, labels = [], []
        for batch in batches:
            logits.append(logits_of(model, batch).detach().float().cpu())
            labels.append(batch["labels"].cpu())
        if not logits:
            raise RosafxError("The evaluation data has no rows.")
        return scores(self.task, logits, labels)


    def causal_lm(self, model, batches) -> dict:
        """Summed per batch: a vocabulary-wide float32 copy of every batch's logits is never kept."""
        total, count, seen = 0.0, 0, False
        for batch in batches:
            seen = True
            logits = logits_of(model, batch).detach()
            check_outputs(self.task, [logits], [batch["labels"]], None)
            nll, kept = next_token_nll(logits, batch["labels"].to(logits.device))
            total, count = total + float(nll), count + int(kept)
        if not seen:
            raise RosafxError("The evaluation data has no rows.")
        return perplexity_scores(total, count)


def best_metric_of(task: str) -> str:
    return {"classification": "accuracy", "regression": "pearson", "causal-lm": "perplexity"}[task]
