"""Generation with an adapted or merged model.

A captured graph is one forward pass with the KV cache off (``capture`` switches
``use_cache`` off: a cache object cannot cross the export boundary). Two ways to generate:

* ``greedy(graph, input_ids, ...)``: greedy decoding through the graph itself, recomputing
  the whole sequence each step (the sequence dim is dynamic). Works for an adapted model
  in training as well as a merged one; cost grows quadratically, so it is for checks and
  short continuations.
* ``into_model(model, merged)``: a copy of the user's model carrying the merged weights
  (merge keeps every parameter's name and layout), on which the model's own ``generate``
  runs with its KV cache switched on at call time, as for any checkpoint;
  ``greedy_with_cache`` is that call for one prompt (what `rosafx generate RUN` runs, and the
  reference the cached ONNX is held to: ``onnx_decoding.py``).
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from rosafx.errors import RosafxError


def _logits(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits


@torch.no_grad()
def greedy(graph: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 8,
           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` (no cache): returns prompt + new tokens."""
    was_training = graph.training
    graph.eval()
    ids = input_ids
    if attention_mask is None and _takes(graph, "attention_mask"):
        attention_mask = torch.ones_like(input_ids)
    try:
        for _ in range(max_new_tokens):
            kwargs = {"input_ids": ids}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
            next_ids = _logits(graph(**kwargs))[:, -1, :].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
    finally:
        graph.train(was_training)
    return ids


def _takes(graph: nn.Module, name: str) -> bool:
    if isinstance(graph, fx.GraphModule):
        return any(n.op == "placeholder" and n.target == name for n in graph.graph.nodes)
    import inspect
    return name in inspect.signature(graph.forward).parameters


def into_model(model: nn.Module, merged: fx.GraphModule) -> nn.Module:
    """A copy of ``model`` whose weights are the merged graph's (the user's model is not touched)."""
    result = copy.deepcopy(model)
    own = result.state_dict()
    state = merged.state_dict()
    renamed = sorted(k for k in state if k.endswith("_merged"))
    if renamed:
        raise RosafxError(f"Merged weights {renamed} were untied from a weight the model shares; into_model "
                          "cannot write them back into a tied model. Exclude the tied site from the rules.")
    for name, value in state.items():
        if name in own:
            if own[name].shape != value.shape:
                raise RosafxError(f"Merged weight '{name}' has shape {tuple(value.shape)}, the model's "
                                  f"{tuple(own[name].shape)}: this merged graph was not built from this model.")
            own[name] = value
    result.load_state_dict(own)
    return result.eval()


@torch.no_grad()
def greedy_with_cache(model: nn.Module, prompt_ids: list[int], max_new_tokens: int,
                      eos_ids: set[int] = frozenset()) -> list[int]:
    """New token ids from transformers' own greedy ``generate`` with its KV cache (the prompt
    excluded; an EOS token ends it and is kept). The generation config is given whole, so a
    checkpoint's sampling defaults (temperature, repetition penalty) cannot change the tokens."""
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model.eval().generate(ids, attention_mask=torch.ones_like(ids),
                                generation_config=greedy_config(model, max_new_tokens, eos_ids))
    return out[0, ids.shape[1]:].tolist()


def greedy_config(model: nn.Module, max_new_tokens: int, eos_ids, pad_id: int | None = None):
    """The whole generation config of greedy decoding with the KV cache: given whole, so that a
    checkpoint's sampling defaults (temperature, repetition penalty) cannot change the tokens.
    ``pad_id`` None: the model's pad id, else the first EOS id."""
    from transformers import GenerationConfig
    eos = sorted(eos_ids) or None
    if pad_id is None:
        pad_id = getattr(model.config.get_text_config(decoder=True), "pad_token_id", None)
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, use_cache=True,
                            eos_token_id=eos, pad_token_id=pad_id if pad_id is not None else (eos or [0])[0])
