"""VeRA: the invariant matrix, the op against float64 autograd, the shared pair stored once."""
import pytest
import torch

import rosafx
from rosafx.errors import RosafxError
from rosafx.graph.adapted_graph import adapters_of

from captures import exported
from invariants import ALL, Case, perturb, rel_err, run, run_check
from models import ZOO, tiny_bert

VERA = {"method": "vera", "rank": 8, "d_initial": 0.1, "seed": 0}
RULES = {
    "bert": {"query": VERA, "value": VERA, "dense": VERA},         # dense: 32->48 and 48->32, shared pair sliced
    "gpt2": {"c_attn": VERA, "c_proj": VERA, "lm_head": VERA},
    "llama": {"q_proj": VERA, "k_proj": VERA, "v_proj": VERA, "down_proj": VERA},
    "functional": {"proj": VERA, "out": VERA},
    "called_twice": {"shared": VERA},
}
ONNX_MODELS = {"bert", "gpt2", "llama"}  # ONNX checks cost seconds each; the rest share their code path


PARAMS = [(m, i) for m in sorted(ZOO) for i in sorted(ALL) if i != "onnx" or m in ONNX_MODELS]


@pytest.mark.parametrize("model,invariant", PARAMS)
def test_vera_invariant(model, invariant, tmp_path):
    run_check(invariant, Case(ZOO[model], RULES[model]), tmp_path)


def vera_reference(x, W, bias, A_shared, B_shared, d, b, x_a=None):
    A, B = A_shared[:, : W.shape[1]], B_shared[: W.shape[0], :]
    x_a = x if x_a is None else x_a
    return x @ W.t() + bias + b * ((d * (x_a @ A.t())) @ B.t())


@pytest.mark.parametrize("lead", [(2, 4), (1, 1)], ids=["8-rows", "1-row"])
@pytest.mark.parametrize("route", ["composite", "opaque"])
@pytest.mark.parametrize("separate_input", [False, True])
def test_op_forward_and_gradients_match_float64(separate_input, route, lead, monkeypatch):
    """rosafx::vera_linear routes a small site to aten ops (merged, or unmerged with its own
    input) and a large one to the opaque op (forced here by a limit no site fits): y and every
    gradient equal float64 autograd of the formula either way, and only the opaque route
    calls the custom op."""
    import rosafx.ops.vera as V
    from test_ops_lowrank import OpsSeen
    if route == "opaque":
        monkeypatch.setattr(V, "COMPOSITE_MACS", -1)
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 5, 7, 3
    tensors = [torch.randn(*lead, in_f, generator=g), torch.randn(out_f, in_f, generator=g),
               torch.randn(out_f, generator=g), torch.randn(r, in_f + 3, generator=g),
               torch.randn(out_f + 2, r, generator=g), torch.randn(r, generator=g), torch.randn(out_f, generator=g)]
    if separate_input:
        tensors.append(torch.randn(*lead, in_f, generator=g))
    grads = [True, True, True, False, False, True, True, True]
    ours = [t.clone().requires_grad_(grads[i]) for i, t in enumerate(tensors)]
    ref = [t.double().requires_grad_(grads[i]) for i, t in enumerate(tensors)]
    if route == "composite":    # merged with 8 rows (out·in = 35 ≤ 8·12), unmerged with 1 or its own input
        want = V.composite_merged if lead == (2, 4) and not separate_input else V.composite_unmerged
        assert V.choose_route(*ours) is want
    with OpsSeen() as seen:
        y = torch.ops.rosafx.vera_linear.default(*ours)
        dy = torch.randn(y.shape, generator=g)
        y.backward(dy)
    assert (seen.ops["rosafx.vera_linear_opaque"] == 1) == (route == "opaque")
    y64 = vera_reference(*ref)
    y64.backward(dy.double())
    assert rel_err(y.double(), y64.detach()) < 1e-6
    for i, (a, b) in enumerate(zip(ours, ref)):
        if grads[i]:
            assert rel_err(a.grad.double(), b.grad) < 1e-5, i
        else:
            assert a.grad is None


@pytest.mark.parametrize("separate_input", [False, True])
@pytest.mark.parametrize("rows", [12, 2], ids=["saved", "rebuilt"])
def test_backward_reuses_the_forwards_transient_weight(separate_input, rows, monkeypatch):
    """spec.py's forward_saving opt-in: with x at least as large as W the forward's W + ΔW
    (ΔW with a separate input) reaches the backward, which builds none; with fewer rows the
    backward builds it again. Gradients equal float64 autograd either way, and no handoff
    outlives the call."""
    import rosafx.ops.vera as V
    from rosafx.ops import spec
    built = []
    for name in ("_effective_weight", "delta_weight"):
        original = getattr(V, name)
        monkeypatch.setattr(V, name, lambda *a, _f=original, _n=name: built.append(_n) or _f(*a))
    g = torch.Generator().manual_seed(4)
    out_f, in_f, r = 6, 5, 3
    tensors = [torch.randn(rows, in_f, generator=g), torch.randn(out_f, in_f, generator=g),
               torch.randn(out_f, generator=g), torch.randn(r, in_f, generator=g),
               torch.randn(out_f, r, generator=g), torch.randn(r, generator=g), torch.randn(out_f, generator=g)]
    if separate_input:
        tensors.append(torch.randn(rows, in_f, generator=g))
    grads = [True, False, False, False, False, True, True, True]
    ours = [t.clone().requires_grad_(grads[i]) for i, t in enumerate(tensors)]
    ref = [t.double().requires_grad_(grads[i]) for i, t in enumerate(tensors)]
    y = torch.ops.rosafx.vera_linear_opaque.default(*ours)
    assert spec._HANDOFF.output is None
    forward_builds = len(built)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    vera_reference(*ref).backward(dy.double())
    assert forward_builds == 1 and len(built) == (1 if rows == 12 else 2)
    for i, (a, b) in enumerate(zip(ours, ref)):
        if grads[i]:
            assert rel_err(a.grad.double(), b.grad) < 1e-5, i
    with torch.no_grad():
        torch.ops.rosafx.vera_linear_opaque.default(*ours)
    assert spec._HANDOFF.output is None


@pytest.mark.parametrize("separate_input", [False, True])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["large-layer", "bf16-base"])
def test_low_rank_route_matches_float64_and_builds_no_weight(separate_input, base_dtype, monkeypatch):
    """A layer large against the rank (out·in > r·(in + out)), or a bf16 base with fp32 d
    and b: no W + ΔW is built; the base product keeps its dtype; gradients equal float64."""
    import rosafx.ops.vera as V
    built = []
    for name in ("_effective_weight", "delta_weight"):
        original = getattr(V, name)
        monkeypatch.setattr(V, name, lambda *a, _f=original, _n=name: built.append(_n) or _f(*a))
    g = torch.Generator().manual_seed(5)
    out_f, in_f, r = (9, 11, 2) if base_dtype == torch.float32 else (5, 7, 3)   # the bf16 shape is dense-sized
    tensors = [torch.randn(3, 4, in_f, generator=g), torch.randn(out_f, in_f, generator=g),
               torch.randn(out_f, generator=g), torch.randn(r, in_f + 3, generator=g),
               torch.randn(out_f + 2, r, generator=g), torch.randn(r, generator=g), torch.randn(out_f, generator=g)]
    if separate_input:
        tensors.append(torch.randn(3, 4, in_f, generator=g))
    half = {0, 1, 2, 7}                       # x, W, bias, x_a in the base dtype; the rest fp32
    grads = [True, False, False, False, False, True, True, True]
    ours = [(t.to(base_dtype) if i in half else t).requires_grad_(grads[i]) for i, t in enumerate(tensors)]
    ref = [t.detach().double().requires_grad_(grads[i]) for i, t in enumerate(ours)]
    y = torch.ops.rosafx.vera_linear_opaque.default(*ours)
    assert y.dtype == base_dtype
    dy = torch.randn(y.shape, generator=g).to(base_dtype)
    y.backward(dy)
    y64 = vera_reference(*ref)
    y64.backward(dy.double())
    tol = 1e-5 if base_dtype == torch.float32 else 2e-2
    assert built == [] and rel_err(y.double(), y64.detach()) < tol
    for i, (a, b) in enumerate(zip(ours, ref)):
        if grads[i]:
            assert rel_err(a.grad.double(), b.grad) < tol, i


def test_delta_weight_is_diag_b_B_diag_d_A_and_pair_is_stored_once():
    model, program, _ = exported(tiny_bert)
    adapted = rosafx.transform(program, RULES["bert"])
    perturb(adapted)
    A, B = adapted.rosafx_shared.vera_A.double(), adapted.rosafx_shared.vera_B.double()
    sites = adapters_of(adapted)
    in_max = max(a.in_features for a in sites.values())
    out_max = max(a.out_features for a in sites.values())
    assert A.shape == (8, in_max) and B.shape == (out_max, 8)
    for adapter in sites.values():
        d, b = adapter.lambda_d.detach().double(), adapter.lambda_b.detach().double()
        want = torch.diag(b) @ B[: adapter.out_features] @ torch.diag(d) @ A[:, : adapter.in_features]
        assert rel_err(adapter.delta_weight().double(), want) < 1e-6
        assert not any("vera_A" in n or "vera_B" in n for n, _ in adapter.named_buffers())
    assert sum("vera_A" in n for n, _ in adapted.named_buffers()) == 1
    assert not any(p.requires_grad for p in adapted.rosafx_shared.buffers())


def test_trainable_count_is_out_plus_rank_per_site():
    model, program, _ = exported(tiny_bert)
    adapted = rosafx.transform(program, RULES["bert"])
    sites = adapters_of(adapted)
    want = sum(a.out_features + 8 for a in sites.values())
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == want
    assert all(a.trainable_count() == a.out_features + 8 for a in sites.values())


def test_merge_keeps_no_shared_tensor():
    model, program, _ = exported(tiny_bert)
    adapted = rosafx.transform(program, RULES["bert"])
    perturb(adapted)
    merged = rosafx.merge(adapted)
    names = [n for n, _ in merged.named_parameters()] + [n for n, _ in merged.named_buffers()]
    assert not any("rosafx_shared" in n for n in names), names
    assert not hasattr(merged, "rosafx_shared")


def test_save_stores_the_pair_once(tmp_path):
    from safetensors.torch import load_file
    model, program, _ = exported(tiny_bert)
    adapted = rosafx.transform(program, RULES["bert"])
    rosafx.save(adapted, tmp_path / "a")
    keys = list(load_file(str(tmp_path / "a" / "adapter.safetensors")))
    assert sum(k.endswith("vera_A") for k in keys) == 1 and sum(k.endswith("vera_B") for k in keys) == 1


def test_sites_must_share_rank_and_seed():
    model, program, _ = exported(tiny_bert)
    with pytest.raises(RosafxError, match="'rank'"):
        rosafx.transform(program, {"query": VERA, "value": {**VERA, "rank": 4}})
    with pytest.raises(RosafxError, match="'seed'"):
        rosafx.transform(program, {"query": VERA, "value": {**VERA, "seed": 1}})


def test_seed_changes_the_pair_and_identity_holds_with_dropout():
    model, program, _ = exported(tiny_bert)
    one = rosafx.transform(program, {"query": VERA})
    two = rosafx.transform(program, {"query": {**VERA, "seed": 5, "dropout": 0.1}})
    assert not torch.equal(one.rosafx_shared.vera_A, two.rosafx_shared.vera_A)
    ids = one.meta["rosafx"]["example_inputs"][1]["input_ids"]
    assert rel_err(run(two.eval(), (ids,)), run(model, (ids,))) < 1e-6


def test_route_choice_by_shape():
    """Small sites take aten ops (merged when the rows outweigh the weight, else unmerged); a
    large dense product or a large update ΔW (out·r·in), or autocast, take the opaque op."""
    import rosafx.ops.vera as V

    def args(n, in_f, out_f, r):
        return (torch.randn(n, in_f), torch.randn(out_f, in_f), None, torch.randn(r, in_f), torch.randn(out_f, r),
                torch.randn(r), torch.randn(out_f))
    assert V.choose_route(*args(16, 64, 64, 256)) is V.composite_unmerged       # the host-bound llama row
    assert V.choose_route(*args(128, 64, 64, 256)) is V.composite_merged
    assert V.choose_route(*args(2048, 384, 384, 256)) is None                    # MiniLM: the opaque op
    assert V.choose_route(*args(4, 128, 128, 512)) is None                       # ΔW's 8.4 M multiply-adds
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert V.choose_route(*args(16, 64, 64, 256)) is None
