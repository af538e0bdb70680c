"""rosa (random subspace adaptation): the invariant matrix, the SVD split against float64,
selection, determinism by seed, save/load after a resample. The resample pass itself:
tests/test_resample.py."""
import pytest
import torch
from captures import exported
from invariants import ALL, Case, perturb, run, run_check
from models import ZOO, functional_linear, tiny_bert
from rosafx.graph.adapted_graph import adapters_of

import rosafx
from rosafx.errors import RosafxError

ROSA = {"method": "rosa", "rank": 3, "seed": 0}
RULES = {
    "bert": {"query": ROSA, "value": ROSA, "dense": ROSA},
    "gpt2": {"c_attn": ROSA, "c_proj": ROSA},
    "llama": {"q_proj": ROSA, "k_proj": ROSA, "v_proj": ROSA},
    "functional": {"proj": ROSA, "out": ROSA},
    "called_twice": {"shared": ROSA},
}
MODELS_FOR = {"onnx": ["gpt2", "functional"]}  # ONNX checks are slow: Conv1D (transposed) and F.linear


MATRIX = [(m, i) for i in sorted(ALL) for m in sorted(ZOO) if m in MODELS_FOR.get(i, ZOO)]


@pytest.mark.parametrize("model,invariant", MATRIX)
def test_rosa_invariant(model, invariant, tmp_path):
    # the SVD split is exact only up to fp32 rounding of W − B·A + B·A
    run_check(invariant, Case(ZOO[model], RULES[model], identity_tol=1e-5), tmp_path)


def test_split_matches_float64_svd_and_trainable_count():
    model, example = functional_linear()
    adapted = rosafx.transform(model, {"proj": {"method": "rosa", "rank": 4, "selection": "top"}},
                               example_inputs=example)
    adapter = adapters_of(adapted)["proj"]
    W = model.proj.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    B_ref, A_ref = U[:, :4] * S[:4], Vh[:4]
    # singular vectors are defined up to sign: compare the rank-4 product and the singular values
    assert torch.allclose(adapter.lora_B.double() @ adapter.lora_A.double(), B_ref @ A_ref, atol=1e-5)
    assert torch.allclose(adapter.lora_B.double().norm(dim=0), S[:4], rtol=1e-5)
    assert torch.allclose(adapter.base_weight.double() + adapter.lora_B.double() @ adapter.lora_A.double(), W,
                          atol=1e-6)
    assert adapter.trainable_count() == 4 * (16 + 24)


@pytest.mark.parametrize("selection,start", [("top", 0), ("bottom", 16 - 4)])
def test_selection_picks_the_named_block(selection, start):
    model, example = functional_linear()
    adapted = rosafx.transform(model, {"proj": {"method": "rosa", "rank": 4, "selection": selection}},
                               example_inputs=example)
    S = torch.linalg.svdvals(model.proj.detach().double())
    norms = adapters_of(adapted)["proj"].lora_B.double().norm(dim=0)
    assert torch.allclose(norms, S[start:start + 4], rtol=1e-5)


def test_same_seed_same_subspace_other_seed_other():
    def factors(seed):
        model, program, _ = exported(tiny_bert)
        adapted = rosafx.transform(program, {"query": {"method": "rosa", "rank": 2, "seed": seed}})
        return [a.lora_A.clone() for a in adapters_of(adapted).values()]
    a, b, c = factors(0), factors(0), factors(5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.allclose(x.abs(), z.abs()) for x, z in zip(a, c))


def test_save_load_after_resample(tmp_path):
    model, program, _ = exported(tiny_bert)
    adapted = rosafx.transform(program, {"query": ROSA})
    perturb(adapted)
    rosafx.resample(adapted)
    rosafx.save(adapted, tmp_path / "a")
    loaded = rosafx.load(exported(tiny_bert)[1], tmp_path / "a")
    ids = adapted.meta["rosafx"]["example_inputs"][1]["input_ids"]
    assert torch.equal(run(loaded, (ids,)), run(adapted, (ids,)))
    rosafx.resample(loaded)
    rosafx.resample(adapted)
    assert all(torch.equal(a.lora_A, b.lora_A) for a, b in zip(adapters_of(loaded).values(),
                                                               adapters_of(adapted).values()))


def test_errors():
    model, program, _ = exported(tiny_bert)
    with pytest.raises(RosafxError, match="exceeds"):
        rosafx.transform(program, {"query": {"method": "rosa", "rank": 64}})
    with pytest.raises(RosafxError, match="selection"):
        rosafx.transform(program, {"query": {"method": "rosa", "selection": "middle"}})
