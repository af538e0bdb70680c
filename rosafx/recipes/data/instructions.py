"""Instruction data for causal-lm: a prompt and a response per row, or chat rows.

* **prompt + response columns** (``--prompt-column``, ``--response-column``; found without
  flags for the column pairs in ``INSTRUCTION_COLUMNS``, e.g. GSM8K's ``question``/``answer``):
  the text trained on is ``prompt + PROMPT_END`` then ``response`` then EOS.
* **chat rows** (``--messages-column``, or a ``messages`` column): a list of
  ``{"role", "content"}`` ending with an ``assistant`` message, the response. The earlier
  messages are the prompt, rendered by the tokenizer's chat template with its generation
  prompt when the tokenizer has one, by ``PLAIN_CHAT`` otherwise.

The loss covers the response tokens only (``Encoded.prompt_lengths``: each example's first
tokens are its prompt; batches label them -100). Every response ends with the tokenizer's EOS,
so the model learns to stop. ``--max-length`` is the budget of prompt + response: a long
prompt loses its first tokens (left truncation), a response longer than the budget keeps
its first ``max_length - 1`` tokens (and no EOS); both are counted and said once.
"""
from __future__ import annotations

import dataclasses

import torch

from rosafx.errors import RosafxError
from rosafx.recipes.data.tables import TEXT, Table, strings

PROMPT_END = "\n"   # between a prompt column's text and its response
# The plain chat template, for tokenizers without one: each message on its own line as
# "role: content", then the generation prompt; the response follows it.
PLAIN_CHAT = {"turn": "{role}: {content}\n", "generation_prompt": "assistant: "}
ROLES = ("system", "user", "assistant", "tool")
RESPONSE_ROLE = "assistant"
# Column pairs read as (prompt, response) without flags, first match wins.
INSTRUCTION_COLUMNS = (("prompt", "response"), ("question", "answer"), ("instruction", "output"))
MESSAGES = "messages"


@dataclasses.dataclass
class InstructionRows:
    prompts: list[str]                  # "" for chat rows (rendered with the tokenizer when encoded)
    responses: list[str]                # for chat rows: the last (assistant) message's content
    messages: list[list[dict]] | None   # chat rows
    columns: dict


def instruction_rows(table: Table, text_column, prompt_column, response_column, messages_column
                     ) -> InstructionRows | None:
    """Instruction or chat rows, or None when the rows are plain text (a ``text`` column)."""
    if messages_column or (not (text_column or prompt_column or response_column) and TEXT not in table.columns
                           and MESSAGES in table.columns):
        return _chat_examples(table, messages_column or MESSAGES)
    if prompt_column is None and response_column is None:
        if text_column or TEXT in table.columns:
            return None
        found = next((pair for pair in INSTRUCTION_COLUMNS if set(pair) <= set(table.columns)), None)
        if found is None:
            return None
        prompt_column, response_column = found
    if prompt_column is None or response_column is None:
        given, missing = ("--prompt-column", "--response-column")[::1 if prompt_column else -1]
        raise RosafxError(f"{given} needs {missing} too: name both columns. Columns found: {table.columns}.")
    for flag, name in (("--prompt-column", prompt_column), ("--response-column", response_column)):
        if name not in table.columns:
            raise RosafxError(f"{table.path}: no column '{name}' ({flag}). Columns found: {table.columns}; "
                              f"name the right one with {flag}.")
    prompts, responses = strings(table, prompt_column), strings(table, response_column)
    for line, response in zip(table.lines, responses):
        if not response.strip():
            raise RosafxError(f"{table.path}, line {line}: the response ('{response_column}') is empty; there is "
                              "nothing to learn from the row. Fill it in or remove the row.")
    return InstructionRows(prompts, responses, None, {"prompt": prompt_column, "response": response_column})


def _chat_examples(table: Table, column: str) -> InstructionRows:
    if column not in table.columns:
        raise RosafxError(f"{table.path}: no column '{column}' (--messages-column). Columns found: {table.columns}.")
    rows = table.column(column)
    for line, messages in zip(table.lines, rows):
        problem = _chat_problem(messages)
        if problem:
            raise RosafxError(f"{table.path}, line {line}: '{column}' {problem}. A chat row is a list of "
                              f'{{"role": ..., "content": ...}} (roles {ROLES}) ending with an assistant message.')
    return InstructionRows([""] * len(rows), [messages[-1]["content"] for messages in rows], rows,
                           {"messages": column})


def _chat_problem(messages) -> str | None:
    problem = messages_problem(messages)
    if problem:
        return problem
    if messages[-1]["role"] != RESPONSE_ROLE:
        return f"ends with a {messages[-1]['role']!r} message, not the assistant's response"
    if not messages[-1]["content"].strip():
        return "ends with an empty assistant message: there is nothing to learn from the row"
    return None


def messages_problem(messages) -> str | None:
    """What is wrong with a list of chat messages as such (not its last role), or None."""
    if not isinstance(messages, list) or not messages:
        return f"holds {type(messages).__name__ if messages is not None else 'nothing'}, not a list of messages"
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return f"message {i + 1} is not an object with a text 'role' and 'content'"
        if message["role"] not in ROLES:
            return f"message {i + 1} has the role {message['role']!r}"
    return None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def rendered_prompt(prompt, tokenizer) -> tuple[str, bool]:
    """One prompt as training renders it, and whether the text carries its own special tokens.
    ``prompt``: a prompt column's text (a str: the text and ``PROMPT_END``), or the messages
    before a chat row's response (a list: the tokenizer's chat template with its generation
    prompt, ``PLAIN_CHAT`` without one). ``rosafx generate`` renders its prompts here too."""
    if isinstance(prompt, str):
        return prompt + PROMPT_END, False
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), True
    return "".join(PLAIN_CHAT["turn"].format(**m) for m in prompt) + PLAIN_CHAT["generation_prompt"], False


def prompt_ids(texts: list[str], tokenizer, templated: bool) -> list[list[int]]:
    """Rendered prompts' tokens: a chat template writes its own special tokens, so the tokenizer
    adds none to its texts; other prompts get them as any text does (a Llama tokenizer's BOS)."""
    return tokenizer(texts, add_special_tokens=not templated)["input_ids"]


def rendered(examples, tokenizer) -> tuple[list[str], list[str], bool]:
    """(prompt texts, response texts, whether the prompts carry their own special tokens)."""
    if examples.messages is None:
        return [rendered_prompt(prompt, tokenizer)[0] for prompt in examples.texts], list(examples.responses), False
    templated = has_chat_template(tokenizer)
    prompts, responses = [], []
    for messages in examples.messages:
        prompt, _ = rendered_prompt(messages[:-1], tokenizer)
        if templated:
            whole = tokenizer.apply_chat_template(messages, tokenize=False)
            if not whole.startswith(prompt):
                raise RosafxError("The tokenizer's chat template renders a conversation so that it does not begin "
                                  "with its own prompt (the messages before the response): the response tokens "
                                  "cannot be told apart. Remove chat_template from tokenizer_config.json to use "
                                  "rosafx's plain template (docs/generation.md).")
            # the template's end-of-turn marks stay: the model learns to stop with them
            responses.append(whole[len(prompt):].rstrip())
        else:
            responses.append(messages[-1]["content"])
        prompts.append(prompt)
    return prompts, responses, templated


def eos_id_of(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RosafxError(f"The tokenizer ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) has "
                          "no EOS token, so responses cannot end with one and the model would not learn to stop. "
                          "Set one: tokenizer.eos_token = '...'; tokenizer.save_pretrained(MODEL_DIR).")
    return int(eos)


def token_rows(examples, tokenizer, max_length: int, chunk: int):
    """Per chunk of examples: (prompt ids, response ids) lists fitted to ``max_length``, and
    the counts of truncated prompts and responses."""
    eos = eos_id_of(tokenizer)
    if max_length < 2:
        raise RosafxError(f"--max-length {max_length} leaves no room for a prompt and a response: use 2 or more.")
    prompts, responses, templated = rendered(examples, tokenizer)
    for start in range(0, len(prompts), chunk):
        prompts_ids = prompt_ids(prompts[start:start + chunk], tokenizer, templated)
        response_ids = tokenizer(responses[start:start + chunk], add_special_tokens=False)["input_ids"]
        rows, cut_prompts, cut_responses = [], 0, 0
        for prompt, response in zip(prompts_ids, response_ids):
            if not response or response[-1] != eos:
                response = response + [eos]
            if len(response) > max_length - 1:  # at least one prompt token predicts the first response token
                response, cut_responses = response[:max_length - 1], cut_responses + 1
            room = max_length - len(response)
            if len(prompt) > room:
                prompt, cut_prompts = prompt[len(prompt) - room:], cut_prompts + 1
            rows.append((prompt, response))
        yield rows, cut_prompts, cut_responses


def prompt_token_rows(examples, tokenizer, budget: int, chunk: int = 2048) -> list[list[int]]:
    """Each prompt's tokens, rendered as for training, left-truncated to ``budget`` tokens: the
    prompts an evaluation generates from (independent of the reference responses)."""
    prompts, _, templated = rendered(examples, tokenizer)
    out = []
    for start in range(0, len(prompts), chunk):
        for ids in prompt_ids(prompts[start:start + chunk], tokenizer, templated):
            out.append(ids[max(0, len(ids) - budget):])
    return out


def truncation_note(encoded, max_length: int) -> str | None:
    """The one line said about truncated rows, or None."""
    parts = []
    if encoded.truncated_prompts:
        parts.append(f"{encoded.truncated_prompts} prompt(s) lost their first tokens")
    if encoded.truncated_responses:
        parts.append(f"{encoded.truncated_responses} response(s) were cut to {max_length - 1} tokens (no EOS)")
    if not parts:
        return None
    return (f"note: {' and '.join(parts)} to fit --max-length {max_length} (prompt + response); "
            "raise --max-length to keep them whole.")


def prompt_mask(prompt_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """True where a position of a right-padded row is a prompt token (its label is ignored)."""
    return torch.arange(width) < prompt_lengths[:, None]
