"""Next-token cross entropy over logits without a float32 copy of all of them.

The naive loss, ``F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ...)``, makes a
shifted copy of the logits, upcasts it to float32, keeps float32 log-probabilities of every
position for the backward and builds float32 gradients of the same size: at a 32k vocabulary
and 1,024 tokens each of these is 128 MiB a row of the batch. The captured graph returns
logits (not the hidden states before the LM head), so the saving available here is in the
loss itself: ``NextTokenNLL`` reads the logits a chunk of positions at a time, upcasts only
that chunk, saves nothing but the logits it was given (alive anyway as the graph's output)
and the targets, and recomputes each chunk's softmax in the backward, writing the gradient
straight into one tensor of the logits' dtype. Peak memory against the naive loss:
bench/causal_lm_loss_memory.py, docs/generation.md.
"""
from __future__ import annotations

import torch

IGNORE = -100
CHUNK_ELEMENTS = 1 << 22   # logits upcast at once: 16 MiB of float32 (128 positions at a 32k vocabulary)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t + 1: the labels shifted left, the last position ignored."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets


class NextTokenNLL(torch.autograd.Function):
    """Sum over positions t with target y_t != IGNORE of -log softmax(z_t)[y_t], in float32 (float64
    for float64 logits), one chunk of positions at a time.

    Backward: d/dz_t = g · (softmax(z_t) - onehot(y_t)) for kept positions, 0 for ignored ones, with g
    the incoming gradient of the sum; softmax(z_t) is recomputed per chunk from the saved logits."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        compute = torch.promote_types(logits.dtype, torch.float32)
        total = torch.zeros((), dtype=compute, device=logits.device)
        for rows in _chunks(flat):
            z, y = flat[rows].to(compute), flat_targets[rows]
            keep = y != IGNORE
            picked = z.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
            total = total + ((torch.logsumexp(z, dim=-1) - picked) * keep).sum()
        ctx.save_for_backward(logits, targets)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, targets = ctx.saved_tensors
        flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        compute = torch.promote_types(logits.dtype, torch.float32)
        grad = torch.empty_like(flat)
        for rows in _chunks(flat):
            y = flat_targets[rows]
            keep = (y != IGNORE)[:, None]
            p = torch.softmax(flat[rows].to(compute), dim=-1)   # a new tensor: the logits are not touched
            p.scatter_add_(1, y.clamp(min=0)[:, None], -torch.ones_like(p[:, :1]))
            grad[rows].copy_(p.mul_(keep).mul_(grad_total))   # in place: one chunk-sized temporary
        return grad.view_as(logits), None


def _chunks(flat: torch.Tensor):
    step = max(1, CHUNK_ELEMENTS // max(1, flat.shape[-1]))
    return (slice(start, start + step) for start in range(0, flat.shape[0], step))


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL of the labelled next tokens, how many there are), both tensors (no host sync)."""
    targets = next_token_targets(labels)
    return NextTokenNLL.apply(logits, targets), (targets != IGNORE).sum()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over labelled next tokens (0 for a batch with none, where the naive mean is NaN)."""
    total, count = next_token_nll(logits, labels)
    return total / count.clamp(min=1)
