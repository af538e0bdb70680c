"""LoRA-GA: the invariant matrix after calibrate, the init against an exact float64 SVD of
the eagerly computed gradient, merge against the original weights, HF PEFT's convention
number for number, and the uncalibrated-use errors."""
import copy

import pytest
import torch

import rosafx
from rosafx.errors import RosafxError
from rosafx.methods.lora_ga import gradient_init
from rosafx.graph.adapted_graph import adapters_of

from invariants import ALL, Case, perturb, rel_err, run, run_check
from models import ZOO, main_output, other_inputs, tiny_bert

GA = {"method": "lora-ga", "rank": 2, "alpha": 4}
RULES = {
    "bert": {"pooler.dense": None, "query": GA, "value": GA, "dense": GA},  # the pooler gets no gradient
    "gpt2": {"c_attn": GA, "c_proj": GA},   # not lm_head: tied to wte, whose gradient includes the embedding's
    "llama": {"q_proj": GA, "k_proj": GA, "v_proj": GA, "down_proj": GA},
    "functional": {"proj": GA, "out": GA},
    "called_twice": {"shared": GA},
}
ONNX_MODELS = ("bert", "gpt2", "llama")  # ONNX checks cost seconds each; the others share their code path


def loss_fn(model, batch):
    return main_output(model(*batch)).float()[..., :2].pow(2).mean()  # LayerNorm makes a full mean of squares flat


def calibration_batches(model, inputs):
    return [inputs, other_inputs(model, None if inputs[0].dtype == torch.long else inputs)]


def calibrate(adapted, model, inputs):
    rosafx.calibrate(adapted, calibration_batches(model, inputs), loss_fn, progress=False)


PARAMS = [(m, i) for m in sorted(ZOO) for i in sorted(ALL) if i != "onnx" or m in ONNX_MODELS]


@pytest.mark.parametrize("model,invariant", PARAMS)
def test_lora_ga_invariant_after_calibrate(model, invariant, tmp_path):
    run_check(invariant, Case(ZOO[model], RULES[model], prepare=calibrate, identity_tol=1e-5), tmp_path)


def calibrated_bert(rules=None, seed=0):
    model, _ = tiny_bert()
    adapted = rosafx.transform(model, rules or {"query": GA, "value": GA})
    inputs = (adapted.meta["rosafx"]["example_inputs"][1]["input_ids"],)
    torch.manual_seed(seed)
    calibrate(adapted, model, inputs)
    return model, adapted, inputs


def eager_mean_gradients(model, batches, paths):
    """The reference: the user's own eager model, autograd on the target weights."""
    model = copy.deepcopy(model)
    weights = {p: model.get_submodule(p).weight for p in paths}
    for w in weights.values():
        w.requires_grad_(True)
    for batch in batches:
        loss_fn(model, batch).backward()
    return {p: w.grad.double() / len(batches) for p, w in weights.items()}


def projector(vectors):  # columns -> orthogonal projector onto their span
    q, _ = torch.linalg.qr(vectors)
    return q @ q.t()


def test_init_spans_the_gradient_singular_subspaces_of_the_paper():
    model, adapted, inputs = calibrated_bert()
    paths = list(adapted.meta["rosafx"]["sites"])
    grads = eager_mean_gradients(model, calibration_batches(model, inputs), paths)
    for path in paths:
        adapter = adapters_of(adapted)[path]
        U, S, Vh = torch.linalg.svd(grads[path])
        A, B = adapter.lora_A0.double(), adapter.lora_B0.double()
        factor = adapter.out_features ** 0.25 / 16 ** 0.5
        r = 2
        assert torch.allclose(A @ A.t(), factor ** 2 * torch.eye(r, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(B.t() @ B, factor ** 2 * torch.eye(r, dtype=torch.float64), atol=1e-5)
        assert (projector(A.t()) - projector(Vh[:r].t())).abs().max() < 1e-3          # top-r right vectors
        assert (projector(B) - projector(U[:, r:2 * r])).abs().max() < 1e-3            # left vectors r+1..2r
        assert adapter.scale == pytest.approx(4 / 2 ** 0.5)                            # rsLoRA: alpha/√r
        W0 = model.get_submodule(path).weight.double()
        want = W0 - adapter.scale * B @ A
        assert rel_err(adapter.base_weight.double(), want) < 1e-6


def test_merge_is_exact_relative_to_the_original_weights():
    model, adapted, inputs = calibrated_bert()
    perturb(adapted)
    merged = rosafx.merge(adapted)
    for path in adapted.meta["rosafx"]["sites"]:
        adapter = adapters_of(adapted)[path]
        W0 = model.get_submodule(path).weight.double()
        A, B = adapter.lora_A.double(), adapter.lora_B.double()
        A0, B0 = adapter.lora_A0.double(), adapter.lora_B0.double()
        want = W0 + adapter.scale * (B @ A - B0 @ A0)
        got = merged.get_parameter(adapted.meta["rosafx"]["sites"][path]["weight_name"]).double()
        assert rel_err(got, want) < 1e-6
        assert rel_err(adapter.delta_from_original().double(), want - W0) < 1e-5
    assert rel_err(run(merged, inputs), run(adapted, inputs)) < 1e-5


def test_uncalibrated_training_and_merge_are_errors():
    model, _ = tiny_bert()
    adapted = rosafx.transform(model, {"query": GA})
    ids = adapted.meta["rosafx"]["example_inputs"][1]["input_ids"]
    adapted.eval()
    adapted(ids)  # inference of the unchanged model is allowed
    adapted.train()
    with pytest.raises(RosafxError, match="rosafx.calibrate"):
        adapted(ids)
    with pytest.raises(RosafxError, match="rosafx.calibrate"):
        rosafx.merge(adapted)


def test_rank_too_large_for_the_split_is_an_error():
    with pytest.raises(RosafxError, match="2·rank"):
        gradient_init(torch.randn(6, 5), 3, 16.0, "paper")


def test_peft_convention_equals_peft_preprocess_loraga(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga
    svd_lowrank = torch.svd_lowrank

    def seeded_svd_lowrank(*args, **kwargs):  # one random start for both tools (PEFT draws other numbers between)
        torch.manual_seed(11)
        return svd_lowrank(*args, **kwargs)
    monkeypatch.setattr(torch, "svd_lowrank", seeded_svd_lowrank)
    model, _ = tiny_bert()
    rules = {t: {**GA, "convention": "peft"} for t in ("query", "value")}
    adapted = rosafx.transform(model, rules)
    observed = {}
    for key, adapter in adapters_of(adapted).items():   # record the gradients rosafx averages
        def record(grad, key=key, original=adapter.observe_gradient):
            observed[key] = grad.float().clone() if key not in observed else observed[key].add_(grad.float())
            original(grad)
        adapter.observe_gradient = record
    inputs = (adapted.meta["rosafx"]["example_inputs"][1]["input_ids"],)
    batches = calibration_batches(model, inputs)
    rosafx.calibrate(adapted, batches, loss_fn, progress=False)

    cache = {f"{path}._peft_loraga_grad": observed[path] / len(batches)
             for path in adapted.meta["rosafx"]["sites"]}
    torch.save(cache, tmp_path / "grads.pt")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig())
    peft_base = copy.deepcopy(model)
    preprocess_loraga(peft_base, config, lambda: None, cache_file=str(tmp_path / "grads.pt"))
    peft_model = get_peft_model(peft_base, config).eval()
    checked = 0
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            adapter = adapters_of(adapted)[name]
            assert adapter.scale == module.scaling["default"]
            assert torch.allclose(adapter.lora_A, module.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
            assert torch.allclose(adapter.lora_B, module.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
            assert torch.allclose(adapter.base_weight, module.base_layer.weight, atol=1e-6, rtol=1e-5)
            checked += 1
    assert checked == 4
    assert rel_err(run(adapted.eval(), inputs), run(peft_model, inputs)) < 1e-5


def test_calibrated_model_round_trips_through_save(tmp_path):
    model, adapted, inputs = calibrated_bert()
    perturb(adapted)
    rosafx.save(adapted, tmp_path / "a")
    loaded = rosafx.load(tiny_bert()[0], tmp_path / "a")
    assert torch.equal(run(loaded, inputs), run(adapted, inputs))
    assert all(bool(a.calibrated) for a in adapters_of(loaded).values())
    loaded.train()
    loaded(*inputs)  # no "not calibrated" error after load
    loaded.eval()    # the merged module keeps the mode, and BERT's dropout would differ
    assert rel_err(run(rosafx.merge(loaded), inputs), run(rosafx.merge(adapted), inputs)) < 1e-6
