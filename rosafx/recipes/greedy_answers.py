"""Greedy answers to a data file's prompts, for exact match in ``rosafx evaluate``.

The RUN's adapters are merged and the weights put into a copy of the user's Hugging Face
model (``generation.into_model``), whose own ``generate`` runs with its KV cache: greedy
(``do_sample=False``), at most ``max_new_tokens`` new tokens, stopping at the tokenizer's EOS.
Prompts are the tokens the run trained on before each response (the same rendering and left
truncation, rosafx/recipes/data/instructions.py), left-padded per batch.
"""
from __future__ import annotations

import torch

from rosafx.errors import RosafxError
from rosafx.recipes.data.instructions import eos_id_of
from rosafx.recipes.data.tokens import Encoded


def prompt_ids(encoded: Encoded) -> list[list[int]]:
    if encoded.prompt_lengths is None:
        raise RosafxError("Exact match needs instruction data (prompt and response columns, or chat rows): plain text "
                          "has no prompt to answer. Drop --max-new-tokens/--extract, or name the columns the run "
                          "was trained with.")
    starts = encoded.offsets[:-1]
    return [encoded.ids[start:start + length].tolist() for start, length in zip(starts.tolist(),
                                                                                 encoded.prompt_lengths.tolist())]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                   progress: bool = True) -> list[str]:
    """Each prompt's greedy continuation, decoded without special tokens, up to its first EOS."""
    from tqdm.auto import tqdm
    eos = eos_id_of(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    answers = []
    with tqdm(total=len(prompts), desc="rosafx generate", unit="row", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            rows = prompts[start:start + batch_size]
            width = max(len(row) for row in rows)
            input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=device)
            mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad, use_cache=True)
            for new in out[:, width:].tolist():
                new = new[:new.index(eos)] if eos in new else new
                answers.append(tokenizer.decode(new, skip_special_tokens=True))
            bar.update(len(rows))
    return answers
