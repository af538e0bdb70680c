"""passes/bank.py (rosafx.bank, the default of rosafx.transform): lora's tensors trained as a
few stacked Parameters.

The reference is the same model unbanked (``transform(..., bank=False)``), in float64: per-tensor AdamW on per-site
Parameters, the path the rest of the suite holds to float64 math. Banked training must give
the same outputs, gradients and trained values; merge, save (both formats), load, a dtype
conversion, deepcopy and unbank must see the trained values; methods with a life cycle are
not banked."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rosafx
from rosafx.errors import RosafxError
from rosafx.graph.adapted_graph import adapters_of
from rosafx.passes.bank import BANK, site_grad

from invariants import perturb, rel_err
from test_fuse_siblings import Siblings as Block  # A's 12 wide (five) and 20 wide (down's alone: not banked)


LORA = {"method": "lora", "rank": 3, "alpha": 6}
RULES = {r"q|k|v|gate|up|down": LORA}


def build(rules=RULES, dtype=torch.float64, fuse=False, bank=False):
    torch.manual_seed(0)
    model = Block().to(dtype).eval()
    x = torch.randn(2, 7, 12, dtype=dtype)
    adapted = rosafx.transform(model, rules, example_inputs=(x,), bank=bank)
    adapted.to(dtype)
    perturb(adapted, std=0.3)
    if fuse:
        rosafx.fuse_siblings(adapted)
    return model, adapted, x


def site_tensors(adapted):
    return {f"{path}.{name}": getattr(adapter, name).detach().clone()
            for path, adapter in adapters_of(adapted).items() for name in ("lora_A", "lora_B")}


def loss_of(adapted, x):
    y = adapted(x)
    return (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum(), y


def train(adapted, batches, steps=5):
    adapted.train()
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for x in batches[:steps]:
        optimizer.zero_grad(set_to_none=True)
        loss_of(adapted, x)[0].backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
def test_banked_training_matches_per_tensor_float64(fuse):
    _, reference, x = build(fuse=fuse)
    _, banked, _ = build(fuse=fuse)
    rosafx.bank(banked)
    trainable = [n for n, p in banked.named_parameters() if p.requires_grad]
    # the 12-wide A's, every B (rank wide); down's A, the only 20-wide one, stays on its own
    assert trainable == ["rosafx_adapters.down.lora_A", f"{BANK}.lora_A_0", f"{BANK}.lora_B_1"]
    assert sum(p.numel() for n, p in banked.named_parameters() if p.requires_grad) == \
        sum(p.numel() for p in reference.parameters() if p.requires_grad)

    reference.train(), banked.train()
    loss_ref, y_ref = loss_of(reference, x)
    loss_banked, y_banked = loss_of(banked, x)
    loss_ref.backward(), loss_banked.backward()
    assert rel_err(y_banked, y_ref) < 1e-13
    ref_adapters, banked_adapters = adapters_of(reference), adapters_of(banked)
    for path, adapter in banked_adapters.items():
        for name in ("lora_A", "lora_B"):
            if not getattr(adapter, name).requires_grad:                   # banked: the group holds it
                assert getattr(adapter, name).grad is None
            want = getattr(ref_adapters[path], name).grad
            assert rel_err(site_grad(banked, adapter, name), want) < 1e-12, (path, name)
    assert "lora_A" not in next(iter(banked_adapters.values())).__dict__   # the views are gone

    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 7, 12, generator=g, dtype=torch.float64) for _ in range(5)]
    train(reference, batches), train(banked, batches)
    want, got = site_tensors(reference), site_tensors(banked)
    moved = max(rel_err(want[k], site_tensors(build(fuse=fuse)[1])[k]) for k in want)
    assert moved > 1e-3                                                     # training changed them
    for key in want:
        assert rel_err(got[key], want[key]) < 1e-10, key


def test_merge_save_load_after_banked_training(tmp_path):
    model, banked, x = build(dtype=torch.float32)
    rosafx.bank(banked)
    g = torch.Generator().manual_seed(1)
    train(banked, [torch.randn(2, 7, 12, generator=g) for _ in range(3)])
    banked.eval()
    with torch.no_grad():
        y = banked(x)
        assert rel_err(rosafx.merge(banked)(x), y) < 1e-5
        for fmt in ("rosafx", "peft"):
            rosafx.save(banked, tmp_path / fmt, format=fmt)
            assert rel_err(rosafx.load(model, tmp_path / fmt, example_inputs=(x,))(x), y) < 1e-5, fmt
    state = banked.state_dict()
    assert not any(k.startswith(BANK) for k in state)                       # the site tensors are the state
    fresh = rosafx.transform(model, RULES, example_inputs=(x,))             # banked by default
    fresh.load_state_dict(state)                                            # writes through to the groups
    fresh.eval()
    with torch.no_grad():
        assert rel_err(fresh(x), y) < 1e-6
    group = fresh.get_parameter(f"{BANK}.lora_A_0")
    a = adapters_of(fresh)["q"].lora_A
    assert a.data_ptr() == group.data_ptr() and torch.equal(group[: a.shape[0]], a)


def test_conversion_restacks_and_keeps_training():
    _, banked, x = build(dtype=torch.float32)
    rosafx.bank(banked)
    before = site_tensors(banked)
    banked.to(torch.float64)                      # converts each Parameter on its own: aliasing broken
    optimizer = train(banked, [x.double()], steps=1)
    group = banked.get_parameter(f"{BANK}.lora_A_0")
    assert group.dtype == torch.float64 and any(group is p for p in optimizer.param_groups[0]["params"])
    after = site_tensors(banked)
    adapters = adapters_of(banked)
    offset = 0
    for path in ("q", "k", "v", "gate", "up"):                               # lora_A_0: the 12-wide A's
        a = adapters[path].lora_A
        assert a.data_ptr() == group.data_ptr() + offset * 12 * 8
        assert torch.equal(group.detach()[offset: offset + a.shape[0]], a)
        offset += a.shape[0]
    for key in before:
        assert 0 < (after[key] - before[key].double()).abs().max() < 0.1, key   # trained from the old values


def test_unbank_restores_parameters():
    _, banked, x = build()
    rosafx.bank(banked)
    train(banked, [x], steps=2)
    trained = site_tensors(banked)
    rosafx.unbank(banked)
    assert BANK not in banked._modules and not banked._forward_pre_hooks and not banked._forward_hooks
    names = sorted(n for n, p in banked.named_parameters() if p.requires_grad)
    assert len(names) == 12 and all(n.endswith(("lora_A", "lora_B")) for n in names)
    assert all(torch.equal(v, trained[k]) for k, v in site_tensors(banked).items())
    ptrs = {getattr(a, n).data_ptr() for a in adapters_of(banked).values() for n in ("lora_A", "lora_B")}
    assert len(ptrs) == 12
    loss_of(banked.train(), x)[0].backward()
    assert all(getattr(a, n).grad is not None for a in adapters_of(banked).values() for n in ("lora_A", "lora_B"))


def test_deepcopy_trains_its_own_groups():
    _, banked, x = build()
    rosafx.bank(banked)
    copied = copy.deepcopy(banked)
    original = site_tensors(banked)
    train(copied, [x], steps=2)
    assert all(torch.equal(v, original[k]) for k, v in site_tensors(banked).items())
    assert any(not torch.equal(v, original[k]) for k, v in site_tensors(copied).items())
    assert adapters_of(copied)["q"].lora_A.data_ptr() == copied.get_parameter(f"{BANK}.lora_A_0").data_ptr()


def test_without_gradients_the_parameters_are_read():
    _, banked, x = build()
    rosafx.bank(banked)
    with torch.no_grad():
        y = banked(x)
    assert "lora_A" not in adapters_of(banked)["q"].__dict__
    _, reference, _ = build()
    with torch.no_grad():
        assert rel_err(y, reference(x)) < 1e-13


def test_methods_without_a_life_cycle_are_banked():
    """lora's and vera's tensors are stacked (vera's d and b, all 1-D, into one group); rosa's
    are not (its resample clears each factor's optimizer state)."""
    rules = {r"q|k": LORA, r"v|gate": {"method": "rosa", "rank": 2},
             r"up|down": {"method": "vera", "rank": 4, "d_initial": 0.1}}
    _, banked, x = build(rules=rules)
    rosafx.bank(banked)
    adapters = adapters_of(banked)
    trainable = {n for n, p in banked.named_parameters() if p.requires_grad}
    assert {f"{BANK}.lora_A_0", f"{BANK}.lora_B_1", f"{BANK}.lambda_d_2"} <= trainable   # q, k; up, down
    for path in ("v", "gate"):
        params = list(adapters[path].parameters())
        assert params and all(p.requires_grad for p in params), path      # untouched: their own Parameters
    assert not adapters["q"].lora_A.requires_grad and not adapters["up"].lambda_b.requires_grad


def test_transform_banks_by_default_and_load_too(tmp_path):
    model, banked, x = build(bank=True)
    assert BANK in banked._modules and not adapters_of(banked)["q"].lora_A.requires_grad
    rosafx.save(banked, tmp_path / "saved")
    loaded = rosafx.load(model, tmp_path / "saved", example_inputs=(x,))
    assert BANK in loaded._modules
    _, reference, _ = build()
    assert BANK not in reference._modules
    assert all(p.requires_grad for n, p in reference.named_parameters() if "lora_" in n)


def test_name_filter_finds_the_groups():
    """An optimizer built the PEFT way, by name, trains the banked model as the unbanked one."""
    _, reference, x = build()
    _, banked, _ = build(bank=True)
    for model in (reference, banked):
        model.train()
        optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-2)
        for _ in range(2):
            optimizer.zero_grad()
            loss_of(model, x)[0].backward()
            optimizer.step()
    want, got = site_tensors(reference), site_tensors(banked)
    assert all(rel_err(got[k], want[k]) < 1e-12 for k in want)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_torch_compile_traces_the_hooks_float64(fullgraph):
    """torch.compile traces the bank's hooks with the forward (the split into views, the views
    put in place): one graph, and the gradients reach the groups."""
    _, reference, x = build()
    _, banked, _ = build(bank=True)
    torch._dynamo.reset()
    compiled = torch.compile(banked, backend="aot_eager", fullgraph=fullgraph)
    for model, call in ((reference, reference), (banked, compiled)):
        model.train()
        loss_of(call, x)[0].backward()
    ref_adapters = adapters_of(reference)
    for path, adapter in adapters_of(banked).items():
        for name in ("lora_A", "lora_B"):
            assert rel_err(site_grad(banked, adapter, name), getattr(ref_adapters[path], name).grad) < 1e-12


def test_exporting_a_training_forward_is_refused(monkeypatch):
    _, banked, x = build(bank=True)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    with pytest.raises(RosafxError, match="unbank"):
        banked.train()(x)


def test_banked_vera_trains_as_per_tensor_float64():
    rules = {r"q|k|v|gate|up|down": {"method": "vera", "rank": 4, "d_initial": 0.1}}
    _, reference, x = build(rules=rules)
    _, banked, _ = build(rules=rules, bank=True)
    assert [n for n, p in banked.named_parameters() if p.requires_grad] == [f"{BANK}.lambda_d_0"]
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 7, 12, generator=g, dtype=torch.float64) for _ in range(4)]
    train(reference, batches), train(banked, batches)
    ref_adapters = adapters_of(reference)
    moved = 0.0
    for path, adapter in adapters_of(banked).items():
        for name in ("lambda_d", "lambda_b"):
            want = getattr(ref_adapters[path], name)
            assert rel_err(getattr(adapter, name), want) < 1e-10, (path, name)
        moved = max(moved, float(ref_adapters[path].lambda_b.abs().max()))
    assert moved > 1e-3                                                     # lambda_b left zero: training moved it
