"""A zoo of tiny models, one per kind of site rosafx must handle. Each factory returns
(model, example_inputs) with the model in eval mode and a fixed seed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 97


def _ids(batch=2, seq=7, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def tiny_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    return BertModel(config).eval(), None


def tiny_gpt2():
    """Conv1D sites (addmm, W in x out) and a head tied to the token embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval(), None


def tiny_llama():
    """Grouped KV heads (k/v projections narrower than q)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval(), None


class FunctionalLinear(nn.Module):
    """F.linear on bare parameters (no nn.Linear), with and without bias."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(24, 16) * 0.2)
        self.proj_bias = nn.Parameter(torch.randn(24) * 0.1)
        self.out = nn.Parameter(torch.randn(8, 24) * 0.2)

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.proj, self.proj_bias)), self.out)


def functional_linear():
    torch.manual_seed(0)
    return FunctionalLinear().eval(), (torch.randn(3, 5, 16),)


class CalledTwice(nn.Module):
    """One nn.Linear applied at two places: one site, two calls, one adapter."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.shared(torch.relu(self.shared(x))))


def called_twice():
    torch.manual_seed(0)
    return CalledTwice().eval(), (torch.randn(3, 5, 16),)


ZOO = {
    "bert": tiny_bert,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "functional": functional_linear,
    "called_twice": called_twice,
}


def other_inputs(model, example_inputs, batch=3, seq=5, seed=1):
    """Inputs of another batch size and sequence length than the capture used."""
    if example_inputs is None:
        return (_ids(batch, seq, seed),)
    (x,) = example_inputs
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq, x.shape[-1], generator=g),)


def main_output(out):
    """The tensor to compare: logits / last_hidden_state / the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0]
