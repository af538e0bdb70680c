"""The training loss of each task, as ``loss_fn(model, batch)`` for ``rosafx.fit``, over
the model's logits (the captured graph is called without labels)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rosafx.recipes.data.batches import model_inputs
from rosafx.recipes.data.chunked_loss import next_token_loss


def logits_of(model, batch: dict) -> torch.Tensor:
    out = model(**model_inputs(batch))
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def regression_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(logits.float().squeeze(-1), labels.float())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: position t predicts token t+1; padding (and instruction
    prompts) ignored. In chunks, without a float32 copy of the logits (chunked_loss.py)."""
    return next_token_loss(logits, labels)


LOSSES = {"classification": classification_loss, "regression": regression_loss, "causal-lm": causal_lm_loss}


def loss_for(task: str):
    loss = LOSSES[task]
    return lambda model, batch: loss(logits_of(model, batch), batch["labels"])
