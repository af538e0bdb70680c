"""rosafx.resample (rosa's action through rosafx.act): fold B·A into the frozen weight, factorise again
with a fresh block, reset the factors' optimizer state. References: a float64 SVD of the
folded weight, the model's output before the resample."""
import pytest
import torch
from invariants import perturb, rel_err, run
from models import functional_linear, tiny_bert
from rosafx.graph.adapted_graph import adapters_of

import rosafx
from rosafx.errors import RosafxError

ROSA = {"method": "rosa", "rank": 3, "seed": 0}


def functional_rosa(rules=None):
    model, example = functional_linear()  # proj 24x16 (tall), out 8x24 (wide)
    return rosafx.transform(model, rules or {"proj": ROSA, "out": ROSA}, example_inputs=example), example


def folded64(adapter):
    return (adapter.base_weight.double() + adapter.lora_B.double() @ adapter.lora_A.double()).detach()


def test_resample_is_the_float64_svd_block_of_the_folded_weight():
    adapted, _ = functional_rosa()
    perturb(adapted)  # trained factors: the folded weight is no longer the original W
    adapters = adapters_of(adapted)
    before = {k: folded64(a) for k, a in adapters.items()}
    rosafx.resample(adapted)
    for key, adapter in adapters.items():
        W = before[key]
        assert int(adapter.resamples) == 1
        assert rel_err(folded64(adapter), W) < 1e-6  # base_weight + B·A is still the folded weight
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        start, r = adapter.block_start(), 3
        # singular vectors are defined up to sign: compare singular values and the block's product
        assert torch.allclose(adapter.lora_B.double().norm(dim=0), S[start:start + r], rtol=1e-5)
        assert torch.allclose(adapter.lora_A.double() @ adapter.lora_A.double().T, torch.eye(r, dtype=torch.float64),
                              atol=1e-5)
        block = (U[:, start:start + r] * S[start:start + r]) @ Vh[start:start + r]
        assert rel_err((adapter.lora_B.double() @ adapter.lora_A.double()).detach(), block) < 1e-5


def test_resample_keeps_function_and_changes_factors_in_place():
    adapted, example = functional_rosa()
    perturb(adapted)
    before = run(adapted, example)
    params = {k: (a.lora_A, a.lora_B, a.lora_A.detach().clone()) for k, a in adapters_of(adapted).items()}
    for _ in range(3):
        rosafx.resample(adapted)
        assert rel_err(run(adapted, example), before) <= 1e-5
    for key, adapter in adapters_of(adapted).items():
        A, B, A_before = params[key]
        assert adapter.lora_A is A and adapter.lora_B is B  # the optimizer's references stay valid
        assert not torch.allclose(A.abs(), A_before.abs(), atol=1e-3)
    assert rel_err(run(rosafx.merge(adapted), example), before) <= 1e-5


def test_resample_on_bert_keeps_function_and_merge():
    model, _ = tiny_bert()
    adapted = rosafx.transform(model, {"query": ROSA, "value": ROSA})
    ids = adapted.meta["rosafx"]["example_inputs"][1]["input_ids"]
    perturb(adapted)
    before = run(adapted, (ids,))
    rosafx.resample(adapted)
    assert rel_err(run(adapted, (ids,)), before) <= 1e-5
    assert rel_err(run(rosafx.merge(adapted), (ids,)), before) <= 1e-5


def test_optimizer_state_reset_only_for_rosa_factors_schedule_kept():
    adapted, example = functional_rosa({"proj": ROSA, "out": {"method": "lora", "rank": 2}})
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    adapted.train()
    for _ in range(2):
        optimizer.zero_grad()
        adapted(*example).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    rosa, lora = adapters_of(adapted)["proj"], adapters_of(adapted)["out"]
    lora_state = {k: v.clone() for k, v in optimizer.state[lora.lora_A].items()}
    lr = optimizer.param_groups[0]["lr"]
    rosafx.resample(adapted, optimizer)
    assert rosa.lora_A not in optimizer.state and rosa.lora_B not in optimizer.state
    assert all(torch.equal(optimizer.state[lora.lora_A][k], v) for k, v in lora_state.items())
    assert optimizer.param_groups[0]["params"] == params and optimizer.param_groups[0]["lr"] == lr == 1e-2 * 0.25
    # training goes on: AdamW starts the factors' moments afresh (step 1)
    optimizer.zero_grad()
    adapted(*example).pow(2).mean().backward()
    optimizer.step()
    assert float(optimizer.state[rosa.lora_A]["step"]) == 1.0 and float(optimizer.state[lora.lora_A]["step"]) == 3.0


def test_same_seed_same_resamples_rounds_differ():
    def blocks(seed, rounds):
        adapted, _ = functional_rosa({"proj": {**ROSA, "seed": seed}, "out": {**ROSA, "seed": seed}})
        starts = []
        for _ in range(rounds):
            rosafx.resample(adapted)
            starts.append(tuple(a.block_start() for a in adapters_of(adapted).values()))
        return starts, [a.lora_A.detach().clone() for a in adapters_of(adapted).values()]
    starts, factors = blocks(0, 4)
    starts_again, factors_again = blocks(0, 4)
    assert starts == starts_again and all(torch.equal(x, y) for x, y in zip(factors, factors_again))
    assert len(set(starts)) > 1  # the block moves between rounds
    assert blocks(7, 4)[0] != starts


def test_resample_needs_rosa_sites():
    model, example = functional_linear()
    lora = rosafx.transform(model, {"proj": {"method": "lora"}}, example_inputs=example)
    with pytest.raises(RosafxError, match="rosa sites"):
        rosafx.resample(lora)
    with pytest.raises(RosafxError, match="no known method sites"):
        rosafx.act(lora, "no-such-action")
    with pytest.raises(RosafxError, match="rosafx.transform"):
        rosafx.resample(model)
