"""passes/drop_export_asserts.py: the captured graph holds none of export's metadata checks,
and still computes what the model does (outputs and input gradients against the eager model)."""
import torch

import rosafx
from rosafx.passes.drop_export_asserts import EXPORT_ASSERTS
from rosafx.pipeline.transform import capture_sites

from models import _ids, main_output, tiny_llama


def test_captured_llama_has_no_export_asserts_and_matches_eager():
    model, _ = tiny_llama()
    ids = _ids()
    embeddings = model.get_input_embeddings()
    x = embeddings(ids).detach()
    gm = capture_sites(model, {"inputs_embeds": x}).module
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target in EXPORT_ASSERTS]
    x_ours, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, eager = main_output(gm(inputs_embeds=x_ours)), main_output(model(inputs_embeds=x_eager))
    assert torch.allclose(ours, eager, atol=1e-5)
    ours.pow(2).mean().backward()
    eager.pow(2).mean().backward()
    assert torch.allclose(x_ours.grad, x_eager.grad, atol=1e-6)


def test_adapted_model_trains_without_asserts():
    model, _ = tiny_llama()
    ids = _ids()
    adapted = rosafx.transform(model, {"q_proj": {"method": "lora", "rank": 2}}, example_inputs=(ids,))
    assert not [n for n in adapted.graph.nodes if n.op == "call_function" and n.target in EXPORT_ASSERTS]
    main_output(adapted(ids)).float().pow(2).mean().backward()
