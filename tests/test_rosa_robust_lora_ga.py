"""rosa-robust with lowrank_init="lora-ga": one calibration pass gives the masks and LoRA-GA's
A, B; checked against a float64 SVD of the mean gradient and the invariants that the
offset base weight could break (identity, merge, save/load, only adapters train)."""
import math

import pytest
import torch
from invariants import Case, rel_err, run, run_check
from models import ZOO, functional_linear, main_output
from rosafx.graph.adapted_graph import adapters_of

import rosafx
from rosafx.errors import RosafxError
from rosafx.methods.rosa_robust import apply_masks, masks_of

GA = {"method": "rosa-robust", "rank": 4, "alpha": 8, "density": 0.1, "lowrank_init": "lora-ga"}


def loss_fn(model, batch):
    return main_output(model(*batch)).float()[..., :2].pow(2).mean()


def reference_mean_gradient(batches):
    """float64 mean gradient of ``proj`` by plain autograd on the user's own model."""
    model, _ = functional_linear()
    model = model.double()
    total = torch.zeros_like(model.proj)
    for (x,) in batches:
        model.proj.grad = None
        model(x.double())[..., :2].pow(2).mean().backward()
        total += model.proj.grad
    return total / len(batches)


def projector(basis_rows):
    q, _ = torch.linalg.qr(basis_rows.double().t())
    return q @ q.t()


def test_one_pass_gives_masks_and_lora_ga_factors():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 5, 16, generator=g),) for _ in range(3)]
    model, example = functional_linear()
    adapted = rosafx.transform(model, {"proj": GA}, example_inputs=example)
    plain = rosafx.transform(model, {"proj": {**GA, "lowrank_init": "lora"}}, example_inputs=example)
    before = run(adapted, example)
    rosafx.calibrate(adapted, batches, loss_fn, progress=False)
    rosafx.calibrate(plain, batches, loss_fn, progress=False)
    a, p = adapters_of(adapted)["proj"], adapters_of(plain)["proj"]
    # the masks are those of the default mode: one pass serves both
    assert torch.equal(a.crow_indices, p.crow_indices) and torch.equal(a.col_indices, p.col_indices)
    assert a.col_indices.numel() == math.floor(0.1 * 24 * 16)
    # LoRA-GA "ArB2r": A's rows span the top-4 right singular vectors of the mean gradient,
    # B's columns the left singular vectors 5..8; both scaled by out^{1/4}/√γ
    U, S, Vh = torch.linalg.svd(reference_mean_gradient(batches))
    assert S[3] > 1.05 * S[4] and S[7] > 1.05 * S[8]  # well-separated subspaces: the check is meaningful
    assert torch.allclose(projector(a.lora_A.detach()), projector(Vh[:4]), atol=1e-4)
    assert torch.allclose(projector(a.lora_B.detach().t()), projector(U[:, 4:8].t()), atol=1e-4)
    factor = 24 ** 0.25 / 16 ** 0.5
    assert torch.allclose(a.lora_A.detach().double() @ a.lora_A.detach().double().t(),
                          factor ** 2 * torch.eye(4, dtype=torch.float64), atol=1e-5)
    # the site reads W − s·B0·A0, so the function is unchanged
    want = model.proj.double() - 2.0 * a.lora_B.double() @ a.lora_A.double()
    assert torch.allclose(a.base_weight.double(), want, atol=1e-6)
    assert rel_err(run(adapted, example), before) < 1e-5
    assert a.trainable_count() == 4 * (16 + 24) + math.floor(0.1 * 24 * 16)


def test_restart_flow_keeps_applied_masks_and_initialises_low_rank():
    model, example = functional_linear()
    rules = {"proj": {**GA, "rank": 2, "density": 0.05}}
    warm = rosafx.transform(model, {"proj": {**rules["proj"], "lowrank_init": "lora"}}, example_inputs=example)
    rosafx.calibrate(warm, [example], loss_fn, progress=False)
    masks = masks_of(warm)
    fresh = rosafx.transform(model, rules, example_inputs=example)
    apply_masks(fresh, masks)
    with pytest.raises(RosafxError, match="calibrate"):
        rosafx.merge(fresh)
    other = (torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(3)),)
    rosafx.calibrate(fresh, [other], loss_fn, progress=False)  # other data: masks must stay the applied ones
    for path, (crow, col) in masks_of(fresh).items():
        assert torch.equal(crow, masks[path][0]) and torch.equal(col, masks[path][1])
    assert adapters_of(fresh)["proj"].lora_A.abs().sum() > 0
    assert rel_err(run(fresh, example), run(model, example)) < 1e-5


def calibrate_on(adapted, model, inputs):
    rosafx.calibrate(adapted, [inputs, inputs], loss_fn, progress=False)


MATRIX = [("functional", {"proj": GA}, invariant)
          for invariant in ("identity", "only_adapters_train", "merge", "save_load")]
MATRIX.append(("bert", {"value": {**GA, "rank": 2}, "dense": {**GA, "rank": 2}}, "save_load"))  # HF path, 2 sites


@pytest.mark.parametrize("model,rules,invariant", MATRIX)
def test_invariants_with_lora_ga_init(model, rules, invariant, tmp_path):
    run_check(invariant, Case(ZOO[model], rules, prepare=calibrate_on, identity_tol=1e-5), tmp_path)


def test_lora_ga_init_needs_a_rank():
    model, example = functional_linear()
    with pytest.raises(RosafxError, match="rank"):
        rosafx.transform(model, {"proj": {**GA, "rank": 0}}, example_inputs=example)
