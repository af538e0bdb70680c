"""rosafx.fit: the loop against a hand-written loop (the reference), each method's life
cycle through fit, a toy method's events without any change to fit, resume equality."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import rosafx
from rosafx.errors import RosafxError
from rosafx.methods import REGISTRY
from rosafx.methods.base import Lifecycle, Method
from rosafx.methods.lora import LoraAdapter, LoraConfig
from rosafx.graph.adapted_graph import adapters_of
from rosafx.pipeline.serialize import adapter_tensors

VOCAB = 97


def tiny_classifier(dropout: float = 0.0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config).eval()


def make_batches(n=6, batch=4, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g),
             "labels": torch.randint(0, 2, (batch,), generator=g)} for _ in range(n)]


def loss_fn(model, batch):
    return F.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])


_ADAPTED: dict = {}


def adapt(config, dropout=0.0):
    """A fresh adapted tiny classifier (captured once per config: capture is the slow part)."""
    key = (json.dumps(config, sort_keys=True), dropout)
    if key not in _ADAPTED:
        torch.manual_seed(1)
        _ADAPTED[key] = rosafx.transform(tiny_classifier(dropout), {"query": config, "value": config,
                                                                    "classifier": {"method": "full"}})
    return copy.deepcopy(_ADAPTED[key])


def tensors_close(a: dict, b: dict, rel=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        scale = max(float(b[k].float().abs().max()), 1e-12)
        assert float((a[k].float() - b[k].float()).abs().max()) <= rel * scale, k


def test_fit_equals_a_hand_loop_lora():
    batches = make_batches()
    adapted = adapt({"method": "lora", "rank": 4})
    reference = copy.deepcopy(adapted)
    history = rosafx.fit(adapted, batches, loss_fn, steps=8, lr=1e-2, schedule="constant", progress=False)
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    reference.train()
    losses = []
    for step in range(8):
        loss = loss_fn(reference, batches[step % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tensors_close(adapter_tensors(adapted), adapter_tensors(reference), rel=1e-6)
    assert [r["loss"] for r in history.steps] == pytest.approx(losses, rel=1e-6)
    assert [r["step"] for r in history.steps] == list(range(1, 9))
    assert [r["epoch"] for r in history.steps] == [0] * 6 + [1] * 2


def test_linear_schedule_warmup_and_grad_accum():
    batches = make_batches(n=4)
    adapted = adapt({"method": "lora", "rank": 4})
    history = rosafx.fit(adapted, batches, loss_fn, steps=4, lr=1e-2, warmup_ratio=0.5, grad_accum=2,
                         progress=False)
    # warm-up: 2 steps at lr·1/3, lr·2/3 (factor (s+1)/(w+1)), then linear decay to 0 over 2 steps
    assert [r["lr"] for r in history.steps] == pytest.approx([1e-2 * 2 / 3, 1e-2, 5e-3, 0.0])
    assert [r["epoch"] for r in history.steps] == [0, 0, 1, 1]


class ToyLifecycle(Lifecycle):
    def __init__(self, adapters, log):
        super().__init__(adapters)
        self.log, self.counter = log, 0

    def before_training(self, ctx):
        self.log.append(("before", ctx.step, ctx.total_steps, len(list(ctx.calibration_batches()))))

    def after_step(self, ctx):
        self.counter += 1
        with torch.no_grad():  # the hook may change its adapters: scale B by 0.5 every other step
            if ctx.step % 2 == 0:
                for adapter in self.adapters:
                    adapter.lora_B.mul_(0.5)
        self.log.append(("after", ctx.step, ctx.optimizer is not None))

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state["counter"]


class ToyConfig(LoraConfig):
    method = "toy"


class Toy(Method):
    id, description, Config, Adapter = "toy", "a test method with its own events", ToyConfig, LoraAdapter

    def __init__(self):
        self.log, self.made = [], []

    def lifecycle(self, adapters):
        self.made.append(ToyLifecycle(adapters, self.log))
        return self.made[-1]


def test_a_new_method_plugs_in_its_events(monkeypatch, tmp_path):
    toy = Toy()
    monkeypatch.setitem(REGISTRY, "toy", toy)
    adapted = adapt({"method": "toy", "rank": 4})
    rosafx.fit(adapted, make_batches(), loss_fn, steps=4, calibration_batches=3, run=tmp_path / "run",
               save_every=2, progress=False)
    assert toy.log == [("before", 0, 4, 3)] + [("after", s, True) for s in range(1, 5)]
    assert len(toy.made[0].adapters) == 4  # query and value of two layers
    # its state goes into the checkpoint and comes back on resume
    toy.log.clear()
    rosafx.fit(adapt({"method": "toy", "rank": 4}), make_batches(), loss_fn, steps=6, run=tmp_path / "run",
               resume=True, progress=False)
    assert toy.made[-1].counter == 6 and toy.log[0] == ("before", 4, 6, 6)
    assert [e for e in toy.log if e[0] == "after"] == [("after", 5, True), ("after", 6, True)]


def test_lora_ga_is_calibrated_before_the_first_step():
    batches = make_batches()
    config = {"method": "lora-ga", "rank": 2, "alpha": 4}
    adapted = adapt(config)
    reference = copy.deepcopy(adapted)
    rosafx.fit(adapted, batches, loss_fn, steps=1, lr=1e-2, calibration_batches=3, seed=5, progress=False)
    # reference: rosafx.calibrate on the same three batches, then one AdamW step by hand
    reference.train()
    torch.manual_seed(5)  # svd_lowrank draws a random projection
    rosafx.calibrate(reference, batches[:3], loss_fn, progress=False)
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss_fn(reference, batches[0]).backward()
    optimizer.step()
    assert all(bool(a.calibrated) for a in adapters_of(adapted).values())
    tensors_close(adapter_tensors(adapted), adapter_tensors(reference), rel=1e-6)


def test_rosa_resamples_every_k_steps_and_resets_its_optimizer_state():
    made = []

    def sgd(params):
        made.append(torch.optim.SGD(params, lr=1e-2, momentum=0.9))
        return made[-1]
    batches = make_batches()
    adapted = adapt({"method": "rosa", "rank": 2, "resample_every": 2})
    reference = copy.deepcopy(adapted)
    rosafx.fit(adapted, batches, loss_fn, steps=4, optimizer=sgd, schedule="constant", progress=False)
    rosa = [a for a in adapters_of(adapted).values()]
    assert all(int(a.resamples) == 2 for a in rosa)
    assert all(a.lora_A not in made[0].state and a.lora_B not in made[0].state for a in rosa)  # reset at step 4
    assert adapted.get_parameter("classifier.weight") in made[0].state                          # the head keeps its
    # reference: the hand loop with rosafx.resample every 2 steps
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)
    reference.train()
    for step in range(1, 5):
        loss_fn(reference, batches[step - 1]).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            rosafx.resample(reference, optimizer)
    tensors_close(adapter_tensors(adapted), adapter_tensors(reference), rel=1e-5)


def test_rosa_resamples_each_epoch_by_default():
    adapted = adapt({"method": "rosa", "rank": 2})
    rosafx.fit(adapted, make_batches(n=3), loss_fn, steps=7, progress=False)
    assert all(int(a.resamples) == 2 for a in adapters_of(adapted).values())  # after steps 3 and 6


@pytest.mark.parametrize("warmup", [0, 2])
def test_rosa_robust_masks_after_the_warmup(warmup):
    made = []

    def adam(params):
        made.append(torch.optim.AdamW(params, lr=1e-2))
        return made[-1]
    adapted = adapt({"method": "rosa-robust", "rank": 2, "density": 0.05, "mask_warmup_steps": warmup})
    seen = []

    def watching_loss(model, batch):
        if model.training and torch.is_grad_enabled() and not getattr(model, "_rosafx_calibrating", False):
            seen.append(all(a.masked for a in adapters_of(model).values()))
        return loss_fn(model, batch)
    rosafx.fit(adapted, make_batches(), watching_loss, steps=4, optimizer=adam, progress=False)
    assert seen == [False] * warmup + [True] * (4 - warmup)
    sites = adapters_of(adapted).values()
    assert all(a.col_indices.numel() == a.budget > 0 for a in sites)
    final = made[-1]
    assert len(made) == 2  # built, then rebuilt once the masks replaced sparse_values
    optimized = {id(p) for group in final.param_groups for p in group["params"]}
    assert all(id(a.sparse_values) in optimized and a.sparse_values.abs().sum() > 0 for a in sites)
    if warmup:  # LoRA's moments survive the rebuild: AdamW's step count runs on
        assert float(final.state[next(iter(sites)).lora_A]["step"]) == 4.0
        assert float(final.state[next(iter(sites)).sparse_values]["step"]) == 2.0


CONFIGS = {"lora": {"method": "lora", "rank": 4},
           "rosa": {"method": "rosa", "rank": 2, "resample_every": 3},
           "rosa-robust": {"method": "rosa-robust", "rank": 2, "density": 0.05, "mask_warmup_steps": 5}}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_resume_equals_an_uninterrupted_run(method, tmp_path):
    options = dict(steps=9, lr=5e-3, warmup_ratio=0.2, save_every=4, progress=False, seed=3,
                   eval_batches=make_batches(n=2, seed=9))
    batches = make_batches(n=4)
    whole = adapt(CONFIGS[method], dropout=0.1)
    rosafx.fit(whole, batches, loss_fn, run=tmp_path / "whole", **options)

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # killed after the step-4 checkpoint, mid-run
        return loss_fn(model, batch)
    with pytest.raises(KeyboardInterrupt):
        rosafx.fit(adapt(CONFIGS[method], dropout=0.1), batches, crashing_loss, run=tmp_path / "cut", **options)
    resumed = adapt(CONFIGS[method], dropout=0.1)
    history = rosafx.fit(resumed, batches, loss_fn, run=tmp_path / "cut", resume=True, **options)
    tensors_close(adapter_tensors(resumed), adapter_tensors(whole), rel=1e-6)
    assert [r["step"] for r in history.steps] == list(range(1, 10))
    assert (tmp_path / "cut" / "adapter" / "adapter.safetensors").exists()


def test_fit_errors(tmp_path):
    adapted = adapt({"method": "lora", "rank": 4})
    with pytest.raises(RosafxError, match="exactly one of steps"):
        rosafx.fit(adapted, make_batches(), loss_fn, progress=False)
    with pytest.raises(RosafxError, match="one-shot iterator"):
        rosafx.fit(adapted, (b for b in make_batches()), loss_fn, steps=2, progress=False)
    with pytest.raises(RosafxError, match="no complete checkpoint"):
        rosafx.fit(adapted, make_batches(), loss_fn, steps=2, run=tmp_path / "r", resume=True, progress=False)
    with pytest.raises(RosafxError, match="scalar"):
        rosafx.fit(adapted, make_batches(), lambda m, b: m(input_ids=b["input_ids"]).logits, steps=1, progress=False)


def test_eval_and_best_checkpoint(tmp_path):
    adapted = adapt({"method": "lora", "rank": 4})
    history = rosafx.fit(adapted, make_batches(), loss_fn, steps=6, lr=1e-2, eval_batches=make_batches(n=2, seed=5),
                         eval_every=2, best_metric="loss", run=tmp_path / "run", progress=False)
    assert [e["step"] for e in history.evals] == [2, 4, 6]
    assert history.best == min(history.evals, key=lambda e: e["eval_loss"])
    assert (tmp_path / "run" / "best" / "rosafx.json").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 9


def test_bf16_autocast_tracks_fp32():
    batches = make_batches(n=2)
    fp32 = rosafx.fit(adapt({"method": "lora", "rank": 4}), batches, loss_fn, steps=2, lr=1e-2, progress=False)
    bf16 = rosafx.fit(adapt({"method": "lora", "rank": 4}), batches, loss_fn, steps=2, lr=1e-2, precision="bf16",
                      progress=False)
    assert [r["loss"] for r in bf16.steps] == pytest.approx([r["loss"] for r in fp32.steps], rel=2e-2)


def test_compile_trains_like_eager_and_reports_compile_time():
    """compile=True: sibling fusion + torch.compile (aot_eager here: the autograd formulas are
    traced, no C++ build) gives the eager loop's losses and adapter; compile time apart. The
    compiled AdamW computes its bias corrections from its float32 step-count tensor (eager reads
    it into a Python float), 1e-5 off at step 1, hence rel 1e-4 here; in float64 the two agree
    to 1e-9 (tests/test_compiled_step.py)."""
    config = {"method": "lora", "rank": 4}
    batches = make_batches(4)
    eager, compiled = adapt(config), adapt(config)
    h0 = rosafx.fit(eager, batches, loss_fn, steps=3, lr=1e-2, seed=0, progress=False)
    h1 = rosafx.fit(compiled, batches, loss_fn, steps=3, lr=1e-2, seed=0, compile="aot_eager", progress=False)
    assert [r["loss"] for r in h1.steps] == pytest.approx([r["loss"] for r in h0.steps], rel=1e-4)
    tensors_close(adapter_tensors(compiled), adapter_tensors(eager), rel=1e-4)
    assert any(n.meta.get("rosafx_fused") for n in compiled.graph.nodes)   # query and value share x·Aᵀ
    assert h0.compile_seconds is None and h1.compile_seconds is not None and h1.step_seconds > 0
