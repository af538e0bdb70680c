"""rosafx generate (RUN | OUT) (--prompt TEXT | --data FILE [-o OUT.jsonl]) --max-new-tokens N [--json] [--raw]"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm.auto import tqdm

from rosafx.errors import RosafxError
from rosafx.io.atomic import atomic_file, naming
from rosafx.io.outputs import check_output
from rosafx.recipes.generators import open_generator, prompt_form
from rosafx.recipes.prompts import PromptForm

from rosafx.cli.options import OverwriteOpt

EXAMPLES = """Examples:
  rosafx generate run --prompt "The movie was" --max-new-tokens 32          # torch, the run's merged model
  rosafx generate out --prompt "The movie was" --max-new-tokens 32 --json   # onnxruntime, KV cache
  rosafx generate out --data prompts.jsonl --max-new-tokens 64 -o generated.jsonl
  rosafx generate out --prompt "$(cat rendered.txt)" --raw --max-new-tokens 32   # a prompt you rendered

Prompts are rendered as the run's training rendered them: prompt + response runs get the prompt \
and a newline; chat runs get the prompt as one user message in the chat template (with its generation \
prompt), and --data rows of chat messages whole; plain-text runs get the text as is. --raw feeds the \
text as is."""
# looked for in this order when --prompt-column is not given, after the run's own column
PROMPT_COLUMNS = ("prompt", "text")
CHAT_COLUMNS = ("messages",)  # chat runs: conversations, looked for before the prompt columns


def generate(target: Annotated[Path, typer.Argument(help="A causal-lm RUN from `rosafx train` (torch), or its export "
                                                    "folder from `rosafx export RUN --merge` (onnxruntime)")],
             max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate at most "
                                                         "(fewer when an end-of-sequence token comes)")],
             prompt: Annotated[Optional[str], typer.Option("--prompt", help="The prompt: rendered as the run's "
                                                  "training rendered its prompts (--raw: as is)")] = None,
             data: Annotated[Optional[Path], typer.Option("--data", help="Generate for every row of this file "
                                                          "(.jsonl, .csv, .tsv, .txt) into JSON Lines")] = None,
             prompt_column: Annotated[Optional[str], typer.Option("--prompt-column", help="The column holding "
                                      "prompts in --data (default: the run's own prompt or messages column, then "
                                      "'messages' for a chat run, 'prompt', 'text')")] = None,
             out: Annotated[Optional[Path], typer.Option("--out", "-o", help="JSON Lines file for --data "
                                                         "(default: standard output)")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, token_ids "
                                                   "(generated), prompt_token_ids (what the model was fed)")] = False,
             raw: Annotated[bool, typer.Option("--raw", help="Feed the prompt text as is (encoded as plain text), "
                                               "not rendered as the run's training rendered prompts (prompt + "
                                               "newline, or the chat template): for prompts you render yourself")
                            ] = False,
             overwrite: OverwriteOpt = False) -> None:
    """Greedy generation with a trained decoder: torch for a RUN, onnxruntime with the KV cache for an export."""
    if (prompt is None) == (data is None):
        raise RosafxError("Give exactly one of --prompt TEXT or --data FILE.")
    if out is not None and data is None:
        raise RosafxError("-o/--out is for --data (one JSON line per row); with --prompt the result is printed.")
    if out is not None:
        check_output(out, inputs=[target, data], overwrite=overwrite, kind="file")  # before the slow work
    form = prompt_form(target, raw=raw)  # from the run's record: quick
    if data is not None:
        prompts = _prompts(data, prompt_column, form)  # a bad file fails before the model loads
    generator = open_generator(target, form)
    said = set()

    def say(notes):
        for note in notes:
            if note not in said:
                said.add(note)
                typer.echo(f"note: {note}", err=True)

    say(generator.notes)
    if prompt is not None:
        result, notes = generator.generate(prompt, max_new_tokens)
        say(notes)
        typer.echo(json.dumps(result) if as_json else result["text"])
        return
    lines = []
    for text in tqdm(prompts, desc=f"rosafx generate ({generator.runtime})", unit="row"):
        result, notes = generator.generate(text, max_new_tokens)
        say(notes)
        lines.append(json.dumps({"prompt": text, **result}))
    if out is None:
        typer.echo("\n".join(lines))
        return
    with naming(out), atomic_file(out) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    typer.echo(f"{len(lines)} rows written to {out}", err=True)


def _prompts(path: Path, column: str | None, form: PromptForm) -> list:
    """The rows' prompts: texts, and for a chat run conversations (lists of messages) where the
    column holds them. Without --prompt-column: the run's own prompt or messages column, then
    (chat runs) 'messages', then 'prompt', then 'text'."""
    from rosafx.recipes.prompts import as_prompt
    from rosafx.recipes.data.tables import read_table
    table = read_table(path)
    if column is None:
        looked = ([form.column] if form.column else []) + list(CHAT_COLUMNS if form.kind == "chat" else ())
        looked = list(dict.fromkeys(looked + list(PROMPT_COLUMNS)))
        column = next((c for c in looked if c in table.columns), None)
        if column is None:
            raise RosafxError(f"{path} has none of the columns {looked}; name the prompts' column with "
                              f"--prompt-column. Columns found: {table.columns}.")
    values = table.column(column)
    for value, line in zip(values, table.lines):
        try:
            as_prompt(value, form)
        except RosafxError as exc:
            raise RosafxError(f"{path}, line {line}, '{column}': {exc}") from None
    return values
