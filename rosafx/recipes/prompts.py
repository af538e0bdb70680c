"""A prompt for generation: its token ids, the stop tokens, and what was done to it.

Both sides of ``rosafx generate`` (torch on a RUN, onnxruntime on an export) encode
prompts here, so they feed the model the same ids. A prompt is rendered as the run's
training rendered its prompts (``PromptForm``, read from the run or export record), through
the functions training uses (rosafx/recipes/data/instructions.py). What the user should hear
about (a prompt cut to fit, no stop token) comes back as notes, which the command says once.
"""
from __future__ import annotations

from dataclasses import dataclass

from rosafx.errors import RosafxError
from rosafx.recipes.data.instructions import RESPONSE_ROLE, messages_problem, prompt_ids, rendered_prompt

NO_EOS = ("the tokenizer and the model's generation config name no end-of-sequence token in the "
          "vocabulary: generation stops only at --max-new-tokens")


# The forms of a prompt: "raw" (the text as given: plain-text runs, --raw), "instruction"
# (prompt + response rows: the text and PROMPT_END), "chat" (chat rows: the chat template, or
# PLAIN_CHAT, over the conversation, with the generation prompt).
FORMS = ("raw", "instruction", "chat")
USER_ROLE = "user"
UNRECORDED = ("{where} does not record which columns its training data had (a run from before rosafx recorded "
              "them, with columns found without flags): prompts are fed as given, as with --raw. Export or train "
              "it again with this version to render them as its training did")


@dataclass(frozen=True)
class PromptForm:
    """How the run's training rendered prompts, which ``rosafx generate`` renders its own as."""
    kind: str                 # one of FORMS
    column: str | None        # the run's prompt or messages column: read first from ``--data``
    note: str | None = None   # said once per command (the record does not say)


RAW = PromptForm("raw", None)


def form_of_columns(columns: dict | None, *, where: str, raw: bool = False) -> PromptForm:
    """The form of a run that read its data from ``columns`` (``Examples.columns``: {"messages"},
    {"prompt", "response"} or {"text"}); None: the record does not say (raw, with a note)."""
    if raw:
        return RAW
    if columns is None:
        return PromptForm("raw", None, UNRECORDED.format(where=where))
    if "messages" in columns:
        return PromptForm("chat", columns["messages"])
    if "prompt" in columns:
        return PromptForm("instruction", columns["prompt"])
    return PromptForm("raw", columns.get("text"))


def as_prompt(value, form: PromptForm):
    """``value`` as the form takes it. A chat run: a text becomes one user message; a conversation
    (a list of messages, as in chat data) is taken whole, less a closing assistant message (the reference
    answer of a training or evaluation row: the answer is generated after the messages before
    it). Other forms take text only. Raises RosafxError (a sentence) on anything else."""
    if isinstance(value, str):
        if not value.strip():
            raise RosafxError("The prompt is empty: give some text to continue (--prompt TEXT, or a non-empty "
                              "prompt in every data row).")
        return [{"role": USER_ROLE, "content": value}] if form.kind == "chat" else value
    if form.kind != "chat":
        raise RosafxError(f"The prompt is {type(value).__name__}, not text: a {form.kind} run is prompted with text "
                          "(chat messages only for a run trained on chat rows).")
    problem = messages_problem(value)
    if problem is None and value[-1]["role"] == RESPONSE_ROLE:
        value = value[:-1]
        problem = None if value else "holds only the assistant's answer: there is nothing to answer"
    if problem:
        raise RosafxError(f"The conversation {problem}. A conversation is a list of {{\"role\": ..., \"content\": "
                          "...}} messages; its answer is generated after the last one.")
    return value


@dataclass
class Prompt:
    ids: list[int]        # what the model is fed
    notes: list[str]      # what the user should be told (once per command)


def positions_of(config) -> int | None:
    """How many positions the model has (prompt + new tokens), or None where it does not say:
    the recipe's reading (``recipe.positions_of``) of the decoder's own config."""
    from rosafx.recipes.recipe import positions_of as config_positions
    return config_positions(config.get_text_config(decoder=True))


def encode_prompt(tokenizer, prompt, *, form: PromptForm, positions: int | None, max_new_tokens: int) -> Prompt:
    """Token ids of ``prompt`` (a text, or for a chat run a conversation: ``as_prompt``) in the run's
    form: instruction and chat prompts exactly as training rendered and tokenised them (its
    ``rendered_prompt`` and ``prompt_ids``); raw text as training encoded plain text (the
    tokenizer's special tokens) without a closing end/separator token: a prompt is continued,
    not ended. A prompt longer than the positions left after ``max_new_tokens`` keeps its last
    tokens (the ones next to what comes)."""
    prompt = as_prompt(prompt, form)
    if max_new_tokens < 1:
        raise RosafxError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    if form.kind == "raw":
        ids = list(tokenizer(prompt)["input_ids"])
        closing = {tokenizer.sep_token_id, tokenizer.eos_token_id} - {None}
        if len(ids) > 1 and ids[-1] in closing:
            ids = ids[:-1]
    else:
        text, templated = rendered_prompt(prompt, tokenizer)
        ids = list(prompt_ids([text], tokenizer, templated)[0])
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
