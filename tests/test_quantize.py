"""Quantized frozen bases (rosafx/ops/quantized.py, passes/quantize.py): each scheme's
dequantized weight against a float64 reference written here from its definition (QLoRA's
NF4 quantiles, symmetric absmax int4/int8), and every method's life cycle on every scheme
against a float64 model built on that reference weight: identity at init, only adapters
train, merge equals the adapted model, save/load onto a quantized base, HF PEFT's QLoRA
adapter, the errors and the resident bytes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rosafx
from rosafx.errors import RosafxError
from rosafx.graph.adapted_graph import adapters_of, quantized_weights, record
from rosafx.ops.quantized import NF4_LEVELS, Quantization, QuantizedWeight, dequantize, packed_bytes, quantize

SCHEMES = ("nf4", "int4", "int8")
METHODS = {
    "lora": {"method": "lora", "rank": 4, "alpha": 8},
    "rosa": {"method": "rosa", "rank": 4},
    "vera": {"method": "vera", "rank": 8},
    "rosa-robust": {"method": "rosa-robust", "rank": 4, "density": 0.05},
    "lora-ga": {"method": "lora-ga", "rank": 4},
}
NEEDS_DATA = ("rosa-robust", "lora-ga")


# ---------------------------------------------------------------- the float64 reference
def nf4_levels_from_the_paper() -> torch.Tensor:
    """QLoRA's NF4: 8 positive quantiles of N(0, 1) at linspace(δ, 1/2, 9)[:-1], 7 negative ones at
    linspace(δ, 1/2, 8)[:-1], and an exact 0, divided by the largest (δ = 0.9677083, bitsandbytes)."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    return (levels / levels.max()).sort().values


def reference_levels(scheme: str) -> torch.Tensor:
    if scheme == "nf4":
        return nf4_levels_from_the_paper()
    top = {"int4": 7, "int8": 127}[scheme]
    return torch.arange(-top, top + 1, dtype=torch.float64) / top


def reference_dequantized(weight: torch.Tensor, scheme: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ŵ in float64, how far each normalised weight lies from a decision midpoint): blockwise
    absmax along the rows, nearest level by brute force."""
    rows, cols = weight.shape
    groups = weight.double().reshape(rows, cols // group_size, group_size)
    absmax = groups.abs().amax(dim=2, keepdim=True)
    normalised = groups / absmax.clamp_min(1e-300)
    levels = reference_levels(scheme)
    distance = (normalised.unsqueeze(-1) - levels).abs()
    nearest = distance.argmin(dim=-1)
    two = distance.topk(2, dim=-1, largest=False).values
    return (levels[nearest] * absmax).reshape(rows, cols), (two[..., 1] - two[..., 0]).reshape(rows, cols)


# ---------------------------------------------------------------- the model
class Tiny(nn.Module):
    """Two sites sharing an input, one without adapter, and a head trained in full."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.query, self.key = nn.Linear(128, 64), nn.Linear(128, 64)
        self.out, self.head = nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.relu(self.out(torch.relu(self.query(x) + self.key(x)))))


RULES_SITES = ("query", "key")
QUANTIZED = ("query", "key", "out")    # every linear site but the full head
X = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1))
BATCHES = [torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]


def loss_fn(model, batch):
    return model(batch).pow(2).mean()


def rules(method: str) -> dict:
    return {**{site: METHODS[method] for site in RULES_SITES}, "head": {"method": "full"}}


def reference_model(model: nn.Module, scheme: str, group_size: int = 64) -> nn.Module:
    """The user's model in float64 with every quantized weight replaced by the reference Ŵ."""
    ref = copy.deepcopy(model).double()
    for name in QUANTIZED:
        layer = getattr(ref, name)
        layer.weight.data = reference_dequantized(getattr(model, name).weight.detach(), scheme, group_size)[0]
    return ref


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------- schemes
def test_nf4_levels_are_the_papers_normal_quantiles():
    assert torch.allclose(torch.tensor(NF4_LEVELS, dtype=torch.float64), nf4_levels_from_the_paper(), atol=1e-7)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group_size", [64, 32])
def test_dequantized_weight_matches_the_float64_reference(scheme, group_size):
    weight = torch.randn(48, 192, generator=torch.Generator().manual_seed(7)) * 0.05
    weight[3, :group_size] = 0.0                                    # an all-zero group decodes to zeros
    q = Quantization(scheme, group_size)
    packed, scales = quantize(weight, q)
    ours = dequantize(packed, scales, scheme)
    expected, margin = reference_dequantized(weight, scheme, group_size)
    differ = (ours.double() - expected).abs() > 1e-6 * expected.abs().clamp_min(1e-12)
    assert not differ[margin > 1e-5].any()                          # only float ties may round the other way
    assert differ.float().mean() < 1e-3
    assert packed.dtype == torch.uint8 and packed.numel() == weight.numel() // (2 if scheme != "int8" else 1)
    assert packed_bytes(tuple(weight.shape), q) == packed.numel() + scales.numel() * 4


@pytest.mark.parametrize("scheme, limit", [("nf4", 0.16), ("int4", 0.16), ("int8", 0.27)])
def test_resident_bytes_of_the_base_linear_weights(scheme, limit):
    model = Tiny()
    adapted = rosafx.transform(model, rules("lora"), example_inputs=(X,), quantize=scheme)
    fp32 = sum(getattr(model, n).weight.numel() * 4 for n in QUANTIZED)
    stored = sum(b.numel() * b.element_size() for m in quantized_weights(adapted).values() for b in m.buffers())
    assert stored <= limit * fp32
    names = {n for n, _ in adapted.named_parameters()}
    assert not any(f"{n}.weight" in names for n in QUANTIZED) and "head.weight" in names  # the fp32 copies are gone
    assert model.query.weight.dtype == torch.float32 and model.query.weight.requires_grad  # the user's model untouched


# ---------------------------------------------------------------- every method on every scheme
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_merges_saves_and_loads_on_a_quantized_base(scheme, method, tmp_path):
    model = Tiny().eval()
    reference = reference_model(model, scheme)
    adapted = rosafx.transform(model, rules(method), example_inputs=(X,), quantize=scheme).eval()
    if method in NEEDS_DATA:
        rosafx.calibrate(adapted, BATCHES, loss_fn, progress=False)
    # identity: the adapted model computes the float64 model on the reference Ŵ
    assert relative(adapted(X), reference(X.double())) <= 1e-5
    # only adapter tensors and the full head train; the packed base does not move
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("rosafx_adapters.", "rosafx_bank.", "head.")) for n in trainable)
    packed_before = {n: b.clone() for n, b in adapted.named_buffers() if n.startswith("rosafx_quantized.")}
    assert {n.split(".")[1] for n in packed_before} == {f"{n}__weight" for n in QUANTIZED}
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    start = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
    for batch in BATCHES * 2:
        optimizer.zero_grad()
        loss_fn(adapted.train(), batch).backward()
        optimizer.step()
    adapted.eval()
    assert all(torch.equal(b, packed_before[n]) for n, b in adapted.named_buffers() if n in packed_before)
    moved = [n for n, p in adapted.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert any(n.startswith(("rosafx_adapters.", "rosafx_bank.")) for n in moved)
    # merge: a plain fp32 graph, equal to the adapted model
    merged = rosafx.merge(adapted)
    assert not list(merged.buffers()) and all(p.dtype == torch.float32 for p in merged.parameters())
    assert "rosafx_quantized" not in merged.code and "rosafx" not in str([n.target for n in merged.graph.nodes])
    assert relative(merged(X), adapted(X)) <= 1e-6
    untouched, expected = merged.get_parameter("out.weight"), reference_dequantized(model.out.weight.detach(), scheme, 64)[0]
    assert relative(untouched, expected) <= 1e-6                    # a site without adapter: the dequantized Ŵ
    # save -> load onto the quantized base the record names
    rosafx.save(adapted, tmp_path / "adapter")
    loaded = rosafx.load(model, tmp_path / "adapter", example_inputs=(X,)).eval()
    assert record(loaded)["quantize"] == Quantization(scheme, 64)
    assert relative(loaded(X), adapted(X)) <= 1e-6
    assert set(quantized_weights(loaded)) == {f"{n}.weight" for n in QUANTIZED}


def test_rosa_splits_the_dequantized_weight():
    model = Tiny()
    adapted = rosafx.transform(model, rules("rosa"), example_inputs=(X,), quantize="nf4")
    for site in RULES_SITES:
        adapter = adapters_of(adapted)[site]
        total = adapter.base_weight.double() + adapter.lora_B.double() @ adapter.lora_A.double()
        expected = reference_dequantized(getattr(model, site).weight.detach(), "nf4", 64)[0]
        assert relative(total, expected) <= 1e-5


def test_qrosa_masks_come_from_the_gradient_through_the_dequantized_weight():
    """rosa-robust's mask = top-k of the mean squared gradient, computed here in float64 on the
    reference model (the adapters are zero at init, so their gradients do not enter)."""
    model = Tiny()
    adapted = rosafx.transform(model, rules("rosa-robust"), example_inputs=(X,), quantize="int4")
    rosafx.calibrate(adapted, BATCHES, loss_fn, progress=False)
    reference = reference_model(model, "int4")
    squares = {site: 0 for site in RULES_SITES}
    for batch in BATCHES:
        reference.zero_grad()
        loss_fn(reference, batch.double()).backward()
        for site in RULES_SITES:
            squares[site] = squares[site] + getattr(reference, site).weight.grad ** 2
    for site in RULES_SITES:
        adapter = adapters_of(adapted)[site]
        ours = torch.zeros(64, 128, dtype=torch.bool)
        rows = torch.repeat_interleave(torch.arange(64), adapter.crow_indices.diff())
        ours[rows, adapter.col_indices] = True
        k = int(ours.sum())
        assert k == int(0.05 * 64 * 128)
        expected = torch.zeros(64 * 128, dtype=torch.bool)
        expected[squares[site].flatten().topk(k).indices] = True
        assert (ours.flatten() == expected).float().mean() > 0.999  # ties at the k-th value aside


def test_peft_lora_adapter_trained_under_qlora_loads_onto_a_quantized_base(tmp_path):
    """HF PEFT's LoRA on a base whose weights are the dequantized Ŵ (what QLoRA computes
    with) gives the reference numbers; rosafx loads its files onto the packed base."""
    from peft import LoraConfig, get_peft_model
    model = Tiny().eval()
    peft_base = copy.deepcopy(model)
    every_linear = QUANTIZED + ("head",)                            # no module trains in full here
    for name in every_linear:
        getattr(peft_base, name).weight.data = reference_dequantized(getattr(model, name).weight.detach(), "nf4", 64)[0].float()
    peft_model = get_peft_model(peft_base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = rosafx.load(model, tmp_path / "peft", example_inputs=(X,), quantize="nf4").eval()
    assert set(quantized_weights(loaded)) == {f"{n}.weight" for n in every_linear}
    assert relative(loaded(X), peft_model(X)) <= 1e-5


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("quantize, says", [
    ("nf3", "Unknown quantization scheme 'nf3'"),
    ({"scheme": "int4", "group_size": 48}, "does not divide the 128 columns of 'query.weight'"),
    ({"scheme": "int4", "group_size": 7}, "must be an even integer"),
    ({"scheme": "int4", "bits": 4}, "quantize must be one of"),
])
def test_bad_quantization_is_one_clear_error(quantize, says):
    with pytest.raises(RosafxError, match=says.replace("(", r"\(").replace(")", r"\)")):
        rosafx.transform(Tiny(), rules("lora"), example_inputs=(X,), quantize=quantize)


def test_a_module_trained_in_full_keeps_full_precision():
    adapted = rosafx.transform(Tiny(), {"query": METHODS["lora"], "out": {"method": "full"}}, example_inputs=(X,),
                               quantize="int8")
    assert set(quantized_weights(adapted)) == {"query.weight", "key.weight", "head.weight"}
    assert adapted.get_parameter("out.weight").requires_grad


def test_held_weight_is_one_leaf_while_calibrating():
    module = QuantizedWeight(torch.randn(4, 8), Quantization("nf4", 8), "w")
    assert module() is not module()                                 # dequantized per call
    held = module.hold()
    assert module() is held and module() is held
    module.release()
    assert module() is not held and torch.equal(module(), held)


# ---------------------------------------------------------------- what the backward keeps
def test_gradients_through_the_packed_base_match_the_float64_model():
    """Autograd saves the dequantized weight as its packed module and dequantizes it again in
    the backward: the adapters' gradients are the float64 reference model's."""
    model = Tiny()
    adapted = rosafx.transform(model, {"query": METHODS["lora"]}, example_inputs=(X,), quantize="nf4")
    adapter = adapters_of(adapted)["query"]
    with torch.no_grad():
        adapter.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    loss_fn(adapted, X).backward()
    reference = reference_model(model, "nf4")
    for name in QUANTIZED + ("head",):                 # head: quantized here too (no module in full)
        layer = getattr(model, name)
        getattr(reference, name).weight.data = reference_dequantized(layer.weight.detach(), "nf4", 64)[0]
    A = adapter.lora_A.detach().double().requires_grad_()
    B = adapter.lora_B.detach().double().requires_grad_()
    reference.query = WithLoRA(reference.query, A, B, scale=8 / 4)
    loss_fn(reference, X.double()).backward()
    assert relative(adapter.lora_A.grad, A.grad) <= 1e-5 and relative(adapter.lora_B.grad, B.grad) <= 1e-5


class WithLoRA(nn.Module):
    def __init__(self, base, A, B, scale):
        super().__init__()
        self.base, self.A, self.B, self.scale = base, A, B, scale

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.A.t()) @ self.B.t()


def test_the_forward_keeps_no_dequantized_weight_for_the_backward():
    from rosafx.training.memory import live_activation_bytes
    held = {}
    for quantize in (None, "nf4"):
        adapted = rosafx.transform(Tiny(), {"query": METHODS["lora"]}, example_inputs=(X,), quantize=quantize)
        held[quantize], loss = live_activation_bytes(lambda: loss_fn(adapted, X), adapted)
        loss.backward()
    # parameters are not counted (the fp32 base holds its weights anyway); the backward of `out`'s
    # input needs out's weight: a dequantized fp32 copy kept for it would add its 16 KiB
    assert held["nf4"] < held[None] + Tiny().out.weight.nbytes // 2


def test_a_saved_record_with_a_bad_scheme_is_refused(tmp_path):
    import json
    adapted = rosafx.transform(Tiny(), rules("lora"), example_inputs=(X,), quantize="int8")
    rosafx.save(adapted, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "rosafx.json").read_text())
    assert saved["quantize"] == {"scheme": "int8", "group_size": 64}
    saved["quantize"] = {"scheme": "fp2"}
    (tmp_path / "a" / "rosafx.json").write_text(json.dumps(saved))
    with pytest.raises(RosafxError, match="not a valid rosafx adapter record: 'quantize': Unknown quantization"):
        rosafx.load(Tiny(), tmp_path / "a", example_inputs=(X,))


def test_large_sites_give_the_same_gradients_as_the_fp32_base_holding_the_dequantized_weights():
    """Sites above rosafx/ops/lowrank.py's COMPOSITE_MACS run the opaque op (a transient merged
    weight saved for dx): on the packed base its gradients are the fp32 base's, bit for bit,
    when that base holds Ŵ as its weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    x = torch.randn(2, 64, 256)
    site_rules = {"0": METHODS["lora"], "2": METHODS["lora"]}
    packed = rosafx.transform(model, site_rules, example_inputs=(x,), quantize="nf4")
    plain_model = copy.deepcopy(model)
    for name, module in quantized_weights(packed).items():
        plain_model.get_parameter(name).data = module().detach().clone()
    plain = rosafx.transform(plain_model, site_rules, example_inputs=(x,))
    with torch.no_grad():
        for name, param in packed.named_parameters():
            if param.requires_grad:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
                plain.get_parameter(name).copy_(param)
    packed(x).pow(2).mean().backward()
    plain(x).pow(2).mean().backward()
    for name, param in packed.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, plain.get_parameter(name).grad), name
