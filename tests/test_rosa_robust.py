"""rosa-robust (RoSA): the invariant matrix after calibration, masks against a float64
top-k reference, the parameter budget, pure sparse (rank 0), the restart flow."""
import math

import pytest
import torch

import rosafx
from rosafx.errors import RosafxError
from rosafx.methods.rosa_robust import apply_masks, masks_of
from rosafx.graph.adapted_graph import adapters_of

from invariants import ALL, Case, perturb, rel_err, run, run_check
from models import ZOO, called_twice, functional_linear, main_output, tiny_bert

RR = {"method": "rosa-robust", "rank": 2, "alpha": 4, "density": 0.05}
RULES = {
    "bert": {"query": RR, "value": RR, "dense": RR},
    "gpt2": {"c_attn": RR, "c_proj": RR},
    "llama": {"q_proj": RR, "k_proj": RR, "v_proj": RR},
    "functional": {"proj": RR, "out": RR},
    "called_twice": {"shared": RR},
}
MODELS_FOR = {"onnx": ["bert", "gpt2", "functional"]}  # ONNX checks are slow: three zoo models
MATRIX = [(m, i) for i in sorted(ALL) for m in sorted(ZOO) if m in MODELS_FOR.get(i, ZOO)]


def loss_fn(model, batch):
    return main_output(model(*batch)).float()[..., :2].pow(2).mean()  # not LayerNorm-invariant


def calibrate_on(adapted, model, inputs, batches=2):
    rosafx.calibrate(adapted, [inputs] * batches, loss_fn, progress=False)


@pytest.mark.parametrize("model,invariant", MATRIX)
def test_rosa_robust_invariant(model, invariant, tmp_path):
    run_check(invariant, Case(ZOO[model], RULES[model], prepare=calibrate_on), tmp_path)


def dense_gradients(factory, path, batches):
    """Reference: float64 mean of G² of one weight, by plain autograd on the user's model."""
    model, example = factory()
    model = model.double()
    weight = model.get_parameter(path)
    weight.requires_grad_(True)
    total = torch.zeros_like(weight)
    for batch in batches:
        weight.grad = None
        model(*[b.double() for b in batch])[..., :2].pow(2).mean().backward()
        total += weight.grad.square()
    return total / len(batches)


def test_masks_equal_float64_topk_and_budget():
    model, example = functional_linear()
    adapted = rosafx.transform(model, {"proj": {**RR, "density": 0.1}}, example_inputs=example)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 5, 16, generator=g),) for _ in range(3)]
    rosafx.calibrate(adapted, batches, loss_fn, progress=False)
    adapter = adapters_of(adapted)["proj"]
    k = math.floor(0.1 * 24 * 16)
    assert adapter.col_indices.numel() == k and adapter.sparse_values.numel() == k
    stat = dense_gradients(functional_linear, "proj", batches)
    want = set(torch.topk(stat.flatten(), k).indices.tolist())
    rows = torch.repeat_interleave(torch.arange(24), adapter.crow_indices.diff())
    got = set((rows * 16 + adapter.col_indices).tolist())
    assert got == want
    assert adapter.trainable_count() == 2 * (16 + 24) + k
    assert adapter.col_indices.dtype == torch.long


def test_before_calibration_it_trains_as_lora_and_calibrate_later_keeps_function():
    model, _ = tiny_bert()
    adapted = rosafx.transform(model, {"value": RR})  # query's gradient is ~1e-11 in this tiny model
    ids = adapted.meta["rosafx"]["example_inputs"][1]["input_ids"]
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    adapted.train()
    for _ in range(2):
        optimizer.zero_grad()
        loss_fn(adapted, (ids,)).backward()
        optimizer.step()
    adapted.eval()
    before = run(adapted, (ids,))
    assert rel_err(before, run(model, (ids,))) > 0  # the warm-up moved the low-rank part
    rosafx.calibrate(adapted, [(ids,)], loss_fn, progress=False)
    assert rel_err(run(adapted, (ids,)), before) < 1e-6
    assert all(a.col_indices.numel() == math.floor(0.05 * 32 * 32) for a in adapters_of(adapted).values())


def test_rank_zero_is_pure_sparse_and_delta_respects_budget():
    model, example = called_twice()
    adapted = rosafx.transform(model, {"shared": {"method": "rosa-robust", "rank": 0, "density": 0.1}},
                               example_inputs=example)
    rosafx.calibrate(adapted, [example], loss_fn, progress=False)
    perturb(adapted, std=0.5)
    merged = rosafx.merge(adapted)
    delta = merged.get_parameter("shared.weight") - model.shared.weight
    assert int((delta != 0).sum()) <= math.floor(0.1 * 16 * 16)
    assert rel_err(run(merged, example), run(adapted, example)) < 1e-5
    assert adapters_of(adapted)["shared"].trainable_count() == math.floor(0.1 * 16 * 16)


def test_merge_equals_float64_formula():
    model, example = functional_linear()
    adapted = rosafx.transform(model, {"proj": RR}, example_inputs=example)
    rosafx.calibrate(adapted, [example], loss_fn, progress=False)
    perturb(adapted)
    a = adapters_of(adapted)["proj"]
    S = torch.zeros(24, 16, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(24), a.crow_indices.diff())
    S[rows, a.col_indices] = a.sparse_values.detach().double()
    want = model.proj.double() + 2.0 * a.lora_B.double() @ a.lora_A.double() + S
    assert torch.allclose(rosafx.merge(adapted).get_parameter("proj").double(), want, atol=1e-6)


def test_restart_flow_with_saved_masks():
    model, _ = tiny_bert()
    warm = rosafx.transform(model, {"query": RR})
    ids = warm.meta["rosafx"]["example_inputs"][1]["input_ids"]
    rosafx.calibrate(warm, [(ids,)], loss_fn, progress=False)
    masks = masks_of(warm)
    fresh = rosafx.transform(model, {"query": RR})
    apply_masks(fresh, masks)
    assert all(torch.equal(masks_of(fresh)[p][1], masks[p][1]) for p in masks)
    assert rel_err(run(fresh, (ids,)), run(model, (ids,))) < 1e-6
    with pytest.raises(RosafxError, match="no site"):
        apply_masks(fresh, {"nope": masks["encoder.layer.0.attention.self.query"]})


def test_bad_configs():
    model, _ = tiny_bert()
    with pytest.raises(RosafxError, match="density"):
        rosafx.transform(model, {"query": {"method": "rosa-robust", "density": 2.0}})
    with pytest.raises(RosafxError, match="statistic"):
        rosafx.transform(model, {"query": {"method": "rosa-robust", "statistic": "max"}})
