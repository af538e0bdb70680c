"""docs/adding_a_method.md's example method (docs/examples/dense_delta.py), end to end: its op
against float64 autograd, then transform -> one training step (rosafx.fit) -> merge ->
save/load against a float64 model with W + scale·D; and every code block of the doc is
quoted verbatim from the example file, so the walk-through cannot drift from code that runs."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rosafx
from rosafx.errors import RosafxError
from rosafx.methods import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs/examples/dense_delta.py"
DOC = ROOT / "docs/adding_a_method.md"


def _load_example():
    spec = importlib.util.spec_from_file_location("dense_delta_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture
def registered(monkeypatch):
    """The doc's registry line, for this test only."""
    monkeypatch.setitem(REGISTRY, "dense-delta", example.DenseDelta())


def test_op_forward_and_gradients_match_float64():
    g = torch.Generator().manual_seed(0)
    x, W, b, D = (torch.randn(*s, generator=g, requires_grad=True) for s in ((2, 3, 7), (5, 7), (5,), (5, 7)))
    y = torch.ops.rosafx.dense_delta_linear.default(x, W, b, D, 0.3)
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, [x, W, b, D], dy)
    x64, W64, b64, D64 = (t.detach().double().requires_grad_() for t in (x, W, b, D))
    y64 = F.linear(x64, W64 + 0.3 * D64, b64)
    grads64 = torch.autograd.grad(y64, [x64, W64, b64, D64], dy.double())
    assert torch.allclose(y.double(), y64, atol=1e-5)
    for got, want in zip(grads, grads64):
        assert torch.allclose(got.double(), want, atol=1e-5)


def test_transform_train_merge_save_load(registered, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x, target = torch.randn(6, 8), torch.randn(6, 4)
    adapted = rosafx.transform(model, {"0": {"method": "dense-delta", "scale": 0.5}}, example_inputs=(x,))
    assert [n for n, p in adapted.named_parameters() if p.requires_grad] == ["rosafx_adapters.0.delta"]
    assert torch.equal(adapted(x), model(x))                     # D = 0: unchanged at init

    loss_fn = lambda m, batch: (m(batch[0]) - batch[1]).pow(2).mean()  # noqa: E731
    rosafx.fit(adapted, [(x, target)], loss_fn, steps=1, schedule="constant", progress=False,
               optimizer=lambda params: torch.optim.SGD(params, lr=0.1))

    # float64 reference of the same step: D -= lr·∂L/∂D with y = relu(x·(W0 + s·D)ᵀ + b0)·W2ᵀ + b2
    W0, b0, W2, b2 = (t.detach().double() for t in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    D = torch.zeros(8, 8, dtype=torch.float64, requires_grad=True)
    loss = (F.linear(torch.relu(F.linear(x.double(), W0 + 0.5 * D, b0)), W2, b2) - target.double()).pow(2).mean()
    (dD,) = torch.autograd.grad(loss, [D])
    want = F.linear(torch.relu(F.linear(x.double(), W0 + 0.5 * (-0.1 * dD), b0)), W2, b2)
    trained = adapted(x)
    assert torch.allclose(trained.double(), want, atol=1e-5)
    assert not torch.allclose(trained, model(x), atol=1e-4)      # the step did something

    merged = rosafx.merge(adapted)
    assert not any("delta" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged(x), trained, atol=1e-5)
    rosafx.save(adapted, tmp_path / "adapter")
    loaded = rosafx.load(model, tmp_path / "adapter", example_inputs=(x,))
    assert torch.allclose(loaded(x), trained, atol=1e-6)


def test_config_validation_is_the_methods(registered):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(RosafxError, match="scale must be non-zero"):
        rosafx.transform(model, {"0": {"method": "dense-delta", "scale": 0}}, example_inputs=(torch.randn(2, 4),))


def test_every_code_block_of_the_doc_is_quoted_from_the_example():
    """Python blocks are slices of the example file; ``text`` blocks (the registry line, the
    commands) are not code of the example."""
    source = EXAMPLE.read_text()
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    for block in blocks:
        assert block in source, f"doc block not in {EXAMPLE.name}:\n{block}"
