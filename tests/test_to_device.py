"""rosafx.to_device: a graph captured on one device runs on another. The meta device stands in
for a GPU on a CPU-only machine (no data, but every op checks that its tensors share a
device); the real round trip to CUDA runs where there is a GPU."""
import pytest
import torch

import rosafx
from rosafx.graph.adapted_graph import adapters_of

from captures import exported
from invariants import perturb
from kernel_checks import needs_cuda
from models import ZOO, main_output, other_inputs

RULES = {"bert": {"query": {"method": "lora", "rank": 3}, "value": {"method": "vera", "rank": 4}},
         "gpt2": {"c_attn": {"method": "lora", "rank": 3}}}


def devices_in_graph(gm):
    found = set()
    for node in gm.graph.nodes:
        for value in (*node.args, *node.kwargs.values()):
            if isinstance(value, torch.device):
                found.add(value.type)
    return found


@pytest.mark.parametrize("name", sorted(RULES))
def test_graph_weights_adapters_and_constants_move(name):
    model, program, example = exported(ZOO[name])
    adapted = rosafx.transform(program, RULES[name], example_inputs=example)
    assert devices_in_graph(adapted) == {"cpu"}                 # what the pass has to rewrite
    inputs = other_inputs(model, example)
    moved = rosafx.to_device(adapted, "meta")
    assert moved is adapted and devices_in_graph(adapted) == {"meta"}
    assert {t.device.type for t in (*adapted.parameters(), *adapted.buffers())} == {"meta"}
    assert all(t.device.type == "meta" for a in adapters_of(adapted).values() for t in a.parameters())
    out = main_output(adapted(*(t.to("meta") for t in inputs)))   # a CPU leftover would raise here
    assert out.device.type == "meta" and out.shape == main_output(model(*inputs)).shape


@needs_cuda
def test_adapted_on_cpu_trains_on_the_gpu_with_the_same_outputs():
    model, example = ZOO["bert"]()
    adapted = rosafx.transform(model, RULES["bert"], example_inputs=example)
    perturb(adapted)
    inputs = other_inputs(model, example)
    want = main_output(adapted(*inputs))
    rosafx.lower(rosafx.to_device(adapted, "cuda"))             # auto: Triton for CUDA tensors
    got = main_output(adapted(*(t.cuda() for t in inputs)))
    assert (got.cpu() - want).abs().max() <= 1e-5 * want.abs().max()
