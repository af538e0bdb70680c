"""FSDP2 prototype (rosafx/training/fsdp.py, passes/layer_modules.py): 2 CPU processes on gloo, every
layer fully_shard-ed, adapters replicated, train the same adapters as one plain process with
the same global batch; each rank holds half of a layer's weight; the layer-structured graph
computes what the flat one does, with the same parameter names."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rosafx
from rosafx.errors import RosafxError
from rosafx.passes.layer_modules import layer_modules
from rosafx.pipeline.serialize import adapter_tensors

from distributed_worker import BATCHES, ROWS, STEPS, sgd
from fsdp_worker import CONFIG, LAYER_WEIGHT
from test_fit import adapt, loss_fn, make_batches, tensors_close

HERE = Path(__file__).parent


def test_layer_modules_compute_the_same_with_the_same_names():
    adapted = adapt(CONFIG)
    adapted.train()
    with pytest.raises(RosafxError, match="unbank"):
        layer_modules(adapted)                                  # banked: the copy would not see the views
    structured = layer_modules(rosafx.unbank(adapted))
    assert list(structured.state_dict()) != [] and set(structured.state_dict()) == set(adapted.state_dict())
    assert type(structured.get_submodule("bert.encoder.layer.0")).__name__ != type(
        adapted.get_submodule("bert.encoder.layer.0")).__name__  # the layer is a module that runs now
    batch = make_batches(n=1)[0]
    loss_fn(adapted, batch).backward()
    plain = {n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad}
    adapted.zero_grad(set_to_none=True)
    loss_fn(structured, batch).backward()
    for n, p in adapted.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, plain[n]), n


def test_two_ranks_with_sharded_layers_equal_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}   # CPU processes, also on a GPU machine
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "fsdp_worker.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    reference = adapt(CONFIG)
    rosafx.fit(reference, make_batches(n=BATCHES, batch=ROWS), loss_fn, steps=STEPS, optimizer=sgd,
               schedule="constant", progress=False, seed=0)
    full = reference.get_parameter(LAYER_WEIGHT).detach()
    for rank, held in enumerate(ranks):
        half = full.shape[0] // 2
        assert torch.equal(held.pop("held_layer_weight"), full[rank * half:(rank + 1) * half])  # its rows only
        assert torch.equal(held.pop("full_layer_weight"), full)
        tensors_close(held, adapter_tensors(reference), rel=1e-5)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
