"""A prompt for generation: its token ids, the stop tokens, and what was done to it.

Both sides of ``rosafx generate`` (torch on a RUN, onnxruntime on an export) encode
prompts here, so they feed the model the same ids. What the user should hear about
(a prompt cut to fit, no stop token) comes back as notes, which the command says once.
"""
from __future__ import annotations

from dataclasses import dataclass

from rosafx.errors import RosafxError

NO_EOS = ("the tokenizer and the model's generation config name no end-of-sequence token in the "
          "vocabulary: generation stops only at --max-new-tokens")


@dataclass
class Prompt:
    ids: list[int]        # what the model is fed
    notes: list[str]      # what the user should be told (once per command)


def positions_of(config) -> int | None:
    """How many positions the model has (prompt + new tokens), or None where it does not say:
    the recipe's reading (``recipe.positions_of``) of the decoder's own config."""
    from rosafx.recipes.recipe import positions_of as config_positions
    return config_positions(config.get_text_config(decoder=True))


def encode_prompt(tokenizer, text, *, positions: int | None, max_new_tokens: int) -> Prompt:
    """Token ids as training encoded text (the tokenizer's special tokens), without a closing
    end/separator token: a prompt is continued, not ended. A prompt longer than the positions
    left after ``max_new_tokens`` keeps its last tokens (the ones next to what comes)."""
    if not isinstance(text, str) or not text.strip():
        raise RosafxError("The prompt is empty: give some text to continue (--prompt TEXT, or a non-empty "
                          "prompt in every data row).")
    if max_new_tokens < 1:
        raise RosafxError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    ids = list(tokenizer(text)["input_ids"])
    closing = {tokenizer.sep_token_id, tokenizer.eos_token_id} - {None}
    if len(ids) > 1 and ids[-1] in closing:
        ids = ids[:-1]
    notes = []
    if positions is not None:
        room = positions - max_new_tokens
        if room < 1:
            raise RosafxError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the model has "
                              f"{positions} positions in all. Ask for at most {positions - 1} new tokens.")
        if len(ids) > room:
            notes.append(f"a prompt of {len(ids)} tokens was cut from the left to {room} (the model's {positions} "
                         f"positions less --max-new-tokens {max_new_tokens})")
            ids = ids[-room:]
    return Prompt(ids, notes)


def stop_tokens(tokenizer, generation_config, vocab_size: int) -> tuple[set[int], list[str]]:
    """The ids that end generation: the generation config's EOS ids and the tokenizer's, those
    the model can emit (a config may name an id outside a small vocabulary)."""
    ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids]) | {tokenizer.eos_token_id}
    ids = {i for i in ids if isinstance(i, int) and 0 <= i < vocab_size}
    return ids, ([] if ids else [NO_EOS])
