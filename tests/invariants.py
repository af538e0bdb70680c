"""The invariants every method is held to, as reusable checks.

Each check takes a ``Case``: a model factory from tests/models.py, rules, and optionally a
``prepare(adapted, example_args)`` step (``rosafx.calibrate`` for the methods that need
data). References are independent of rosafx: the user's own eager model, float64 math.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch

from rosafx.passes.bank import BANK

import rosafx
from rosafx.graph.adapted_graph import adapters_of

from captures import exported
from models import main_output, other_inputs


@dataclass
class Case:
    factory: Callable
    rules: dict
    prepare: Callable | None = None     # e.g. calibration; called as prepare(adapted, model, inputs)
    identity_tol: float = 1e-6          # relative to the output's scale
    merge_tol: float = 1e-5
    onnx_tol: float = 1e-4
    extra: dict = field(default_factory=dict)

    def build(self):
        model, program, example = exported(self.factory)     # the session's one export, copied
        adapted = rosafx.transform(program, self.rules, example_inputs=example)
        inputs = example if example is not None else (adapted.meta["rosafx"]["example_inputs"][1]["input_ids"],)
        if self.prepare is not None:
            self.prepare(adapted, model, inputs)
        return model, example, adapted, inputs


def run(module, inputs):
    with torch.no_grad():
        return main_output(module(*inputs)).float()


def rel_err(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def perturb(adapted, seed=0, std=0.05):
    """Move every trainable adapter tensor off its init so the delta is not zero."""
    g = torch.Generator().manual_seed(seed)
    banked = banked_ids(adapted)
    with torch.no_grad():
        for adapter in adapters_of(adapted).values():
            for p in adapter.parameters():
                if p.requires_grad or id(p) in banked:
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * std)


def banked_ids(adapted) -> set[int]:
    """ids of the adapter tensors that train through a bank group (passes/bank.py)."""
    bank = adapted._modules.get(BANK)
    return {id(a._parameters[n]) for members in (bank.members if bank else []) for a, n in members}


def trainable_names(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def check_identity_at_init(case: Case):
    model, _, adapted, inputs = case.build()
    assert rel_err(run(adapted, inputs), run(model, inputs)) <= case.identity_tol


def check_only_adapters_train(case: Case, steps: int = 2):
    model, _, adapted, inputs = case.build()
    names = trainable_names(adapted)
    assert names and all(n.startswith(("rosafx_adapters.", "rosafx_shared.", "rosafx_bank."))
                         or any(n.startswith(f + ".") for f in adapted.meta["rosafx"]["plan"].full) for n in names), names
    user_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    banked = banked_ids(adapted)
    base_before = {n: p.detach().clone() for n, p in adapted.named_parameters()
                   if not p.requires_grad and id(p) not in banked}
    train_before = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    adapted.train()
    for _ in range(steps):
        optimizer.zero_grad()
        main_output(adapted(*inputs)).float()[..., :2].pow(2).mean().backward()  # LayerNorm makes the full mean of squares constant
        optimizer.step()
    after = dict(adapted.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base_before.items()), "a frozen weight moved"
    assert any(not torch.equal(after[n], v) for n, v in train_before.items()), "no adapter parameter moved"
    assert all(torch.equal(p, user_before[n]) for n, p in model.named_parameters()), "the user's model changed"
    assert all(p.grad is None for n, p in model.named_parameters()), "the user's model got gradients"


def check_merge(case: Case):
    _, _, adapted, inputs = case.build()
    perturb(adapted)
    merged = rosafx.merge(adapted)
    want = run(adapted, inputs)
    assert rel_err(run(merged, inputs), want) <= case.merge_tol
    assert not any("rosafx" in n.meta for n in merged.graph.nodes)
    assert not any("rosafx_adapters" in n for n, _ in merged.named_parameters())
    assert not any("rosafx_adapters" in n for n, _ in merged.named_buffers())
    assert all(n.target.__module__ != "torch._ops.rosafx" for n in merged.graph.nodes if n.op == "call_function"
               and hasattr(n.target, "__module__"))


def check_onnx(case: Case, tmp_path):
    _, _, adapted, inputs = case.build()
    perturb(adapted)
    report = rosafx.export_onnx(adapted, tmp_path / "model.onnx", latency_repeats=0)
    assert report.max_rel_error <= case.onnx_tol
    assert report.matmul_nodes == report.base_matmul_nodes
    import onnxruntime as ort
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    other = other_inputs(None, None if isinstance(inputs[0], torch.Tensor) and inputs[0].dtype == torch.long
                         else inputs)
    feed = {session.get_inputs()[0].name: other[0].numpy()}
    got = torch.from_numpy(session.run(None, feed)[0])
    assert rel_err(got, run(adapted, other)) <= case.onnx_tol * 10


def check_save_load(case: Case, tmp_path):
    model, example, adapted, inputs = case.build()
    perturb(adapted)
    rosafx.save(adapted, tmp_path / "adapter")
    _, fresh_program, _ = exported(case.factory)
    loaded = rosafx.load(fresh_program, tmp_path / "adapter", example_inputs=example)
    assert torch.equal(run(loaded, inputs), run(adapted, inputs))


def check_dynamic_shapes(case: Case):
    model, example, adapted, inputs = case.build()
    perturb(adapted)
    for batch, seq in ((1, 3), (4, 9)):
        other = other_inputs(model, example, batch=batch, seq=seq)
        out = run(adapted, other)
        assert out.shape[0] == batch and out.shape[1] == seq
        merged = rosafx.merge(adapted)
        assert rel_err(run(merged, other), out) <= case.merge_tol


ALL = {
    "identity": check_identity_at_init,
    "only_adapters_train": check_only_adapters_train,
    "merge": check_merge,
    "onnx": check_onnx,
    "save_load": check_save_load,
    "dynamic_shapes": check_dynamic_shapes,
}


def run_check(name: str, case: Case, tmp_path):
    fn = ALL[name]
    return fn(case, tmp_path) if name in ("onnx", "save_load") else fn(case)


__all__ = ["Case", "ALL", "run_check", "perturb", "rel_err", "run", "copy"]
