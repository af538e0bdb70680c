"""Greedy answers to a data file's prompts, for exact match in ``rosafx evaluate``.

The RUN's adapters are merged and the weights put into a copy of the user's Hugging Face
model (``generation.into_model``), whose own ``generate`` runs with its KV cache: greedy
(``do_sample=False``), at most ``max_new_tokens`` new tokens, stopping at the tokenizer's EOS.
Prompts are rendered as the run rendered them for training (rosafx/recipes/data/instructions.py),
left-truncated to ``--max-length - 1`` tokens (less where the answer would pass the model's
positions), never by the reference's length, and left-padded per batch.
"""
from __future__ import annotations

import torch

from rosafx.errors import RosafxError
from rosafx.recipes.data.instructions import eos_id_of, prompt_token_rows
from rosafx.recipes.generation import greedy_config


def generation_prompts(examples, tokenizer, max_length: int, max_new_tokens: int, positions: int | None
                       ) -> list[list[int]]:
    """The prompts to answer, rendered as the run rendered them for training, left-truncated to
    ``max_length - 1`` tokens, and further where prompt + ``max_new_tokens`` would pass the model's
    ``positions`` (a learned position table, as GPT-2's, has no row beyond it)."""
    if examples.responses is None:
        raise RosafxError("Exact match needs instruction data (prompt and response columns, or chat rows): plain text "
                          "has no prompt to answer. Drop --max-new-tokens/--extract, or name the columns the run "
                          "was trained with.")
    budget = max_length - 1
    if positions is not None:
        if max_new_tokens >= positions:
            raise RosafxError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                              f"{positions} positions: use fewer.")
        budget = min(budget, positions - max_new_tokens)
    return prompt_token_rows(examples, tokenizer, budget)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                   progress: bool = True) -> list[str]:
    """Each prompt's greedy continuation, decoded without special tokens, up to its first EOS."""
    from tqdm.auto import tqdm
    eos = eos_id_of(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = greedy_config(model, max_new_tokens, {eos}, pad)  # whole: a checkpoint's sampling defaults stay out
    device = next(model.parameters()).device
    answers = []
    with tqdm(total=len(prompts), desc="rosafx generate", unit="row", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            rows = prompts[start:start + batch_size]
            width = max(len(row) for row in rows)
            input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=device)
            mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
            for new in out[:, width:].tolist():
                new = new[:new.index(eos)] if eos in new else new
                answers.append(tokenizer.decode(new, skip_special_tokens=True))
            bar.update(len(rows))
    return answers
