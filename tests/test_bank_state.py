"""rosafx/training/bank_state.py: a checkpoint's optimizer state has one form, banked or not.

Reference: the same model unbanked (one Parameter a tensor), trained with the same AdamW in
float64. The banked optimizer's saved state must equal the unbanked one's tensor for tensor,
and either form's state must resume into the other and continue as the uninterrupted run."""
from __future__ import annotations

import pytest
import torch

import rosafx
from rosafx.errors import RosafxError
from rosafx.training.bank_state import FORM
from rosafx.training.optim import Optimization, adamw

from invariants import rel_err
from test_bank import build, loss_of, site_tensors


def optimization_over(model):
    return Optimization(adamw(1e-2, weight_decay=0.1), lambda step: 1.0).build(model)


def steps(model, optimization, batches):
    model.train()
    for x in batches:
        optimization.optimizer.zero_grad(set_to_none=True)
        loss_of(model, x)[0].backward()
        optimization.optimizer.step()
        optimization.scheduler.step()


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, 7, 12, generator=g, dtype=torch.float64) for _ in range(5)]


def test_banked_state_is_the_unbanked_state(batches):
    _, plain, _ = build()
    _, banked, _ = build(bank=True)
    plain_opt, banked_opt = optimization_over(plain), optimization_over(banked)
    assert len(banked_opt.optimizer.param_groups[0]["params"]) < len(plain_opt.optimizer.param_groups[0]["params"])
    steps(plain, plain_opt, batches[:3]), steps(banked, banked_opt, batches[:3])
    want, got = plain_opt.state_dict()["optimizer"], banked_opt.state_dict()["optimizer"]
    assert got[FORM] == want[FORM] == "canonical"
    assert got["param_groups"][0]["params"] == want["param_groups"][0]["params"]
    assert sorted(got["state"]) == sorted(want["state"]) and len(want["state"]) == 12
    for k, entry in want["state"].items():
        for key, value in entry.items():
            assert torch.equal(got["state"][k][key], value), (k, key)


@pytest.mark.parametrize("saved_banked,resumed_banked", [(True, False), (False, True), (True, True)])
def test_state_resumes_across_forms(batches, saved_banked, resumed_banked):
    _, reference, _ = build()
    steps(reference, optimization_over(reference), batches)              # 5 steps, uninterrupted

    _, first, _ = build(bank=saved_banked)
    first_opt = optimization_over(first)
    steps(first, first_opt, batches[:3])
    saved, tensors = first_opt.state_dict(), first.state_dict()

    _, second, _ = build(bank=False)
    second.load_state_dict(tensors)
    if resumed_banked:
        rosafx.bank(second)
    second_opt = optimization_over(second)
    second_opt.load_state_dict(saved)
    steps(second, second_opt, batches[3:])
    want, got = site_tensors(reference), site_tensors(second)
    for key in want:
        assert rel_err(got[key], want[key]) < 1e-12, key


def test_state_of_another_model_is_refused(batches):
    _, banked, _ = build(bank=True)
    opt = optimization_over(banked)
    steps(banked, opt, batches[:1])
    saved = opt.state_dict()
    saved["optimizer"]["param_groups"][0]["params"] = saved["optimizer"]["param_groups"][0]["params"][:-1]
    _, other, _ = build(bank=True)
    with pytest.raises(RosafxError, match="resume with the model the run trained"):
        optimization_over(other).load_state_dict(saved)


def test_several_groups_resume_only_into_the_same_form(batches):
    """A banked model under an optimizer of several parameter groups keeps its own indexing
    (form "banked"); resuming it unbanked is refused with what to do, not a torch error."""
    def two_groups(params):
        params = list(params)
        return torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 1e-3}], lr=1e-2)
    _, banked, _ = build(bank=True)
    opt = Optimization(two_groups, lambda step: 1.0).build(banked)
    steps(banked, opt, batches[:1])
    saved = opt.state_dict()
    assert saved["optimizer"][FORM] == "banked"
    _, again, _ = build(bank=True)
    Optimization(two_groups, lambda step: 1.0).build(again).load_state_dict(saved)   # the same form loads
    _, plain, _ = build()
    with pytest.raises(RosafxError, match="Resume the model as it was trained"):
        Optimization(two_groups, lambda step: 1.0).build(plain).load_state_dict(saved)
