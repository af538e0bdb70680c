"""The chunked next-token loss (rosafx/recipes/data/chunked_loss.py) against F.cross_entropy on
shifted logits in float64: value and gradient, chunks that split rows raggedly, float32 and
bfloat16 logits, ignored positions, a batch with nothing to predict."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rosafx.recipes.data import chunked_loss
from rosafx.recipes.data.objectives import causal_lm_loss


def reference(logits, labels):
    return F.cross_entropy(logits[:, :-1].double().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("chunk_rows", [1, 5, 7, 1000])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
def test_value_and_gradient_match_cross_entropy(monkeypatch, chunk_rows, dtype, tol):
    vocab = 41
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", chunk_rows * vocab)
    torch.manual_seed(0)
    logits = (torch.randn(3, 9, vocab) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (3, 9))
    labels[0, :4] = -100      # a prompt
    labels[2, 6:] = -100      # padding
    ours = causal_lm_loss(logits, labels)
    (grad,) = torch.autograd.grad(ours * 2.5, logits)   # an upstream gradient other than 1
    exact = logits.detach().double().requires_grad_()
    expected = reference(exact, labels)
    (expected_grad,) = torch.autograd.grad(expected * 2.5, exact)
    assert float(ours.detach()) == pytest.approx(float(expected.detach()), rel=tol)
    assert grad.dtype == dtype
    # bfloat16 gradients are rounded once to bfloat16 (8 bits): judged at that rounding
    rounding = 2 ** -8 if dtype == torch.bfloat16 else tol
    assert torch.allclose(grad.double(), expected_grad, rtol=rounding, atol=rounding * float(expected_grad.abs().max()))


def test_nothing_to_predict_gives_zero_not_nan():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = causal_lm_loss(logits, torch.full((2, 4), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
