"""What `rosafx generate TARGET` generates with: a RUN (torch: transformers' greedy
``generate`` with its KV cache, on the user's model carrying the merged weights) or an
export folder (onnxruntime over ``model_with_past.onnx``, one call per new token). Both
encode prompts and choose stop tokens the same way (prompts.py), so their tokens compare.
Prompts are rendered in the form the run trained on (``prompt_form``: from run.json, or the
export record, which carries the run's data columns)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rosafx.errors import RosafxError
from rosafx.recipes.prompts import RAW, PromptForm, encode_prompt, form_of_columns, positions_of, stop_tokens


@dataclass
class Generator:
    tokenizer: object
    config: object                      # the model's HF config (positions, vocabulary)
    continue_ids: Callable               # (prompt ids, max new tokens, stop ids) -> new ids
    runtime: str                         # "torch" or "onnxruntime"
    stop_ids: set[int]
    notes: list[str]                     # said once per command (e.g. no EOS token)
    form: PromptForm = RAW               # how prompts are rendered (as the run's training did, or raw)

    def generate(self, prompt, max_new_tokens: int) -> tuple[dict, list[str]]:
        """({"text", "token_ids", "prompt_token_ids"}, notes about this prompt). ``prompt``: a text,
        or for a chat run a conversation (prompts.as_prompt)."""
        encoded = encode_prompt(self.tokenizer, prompt, form=self.form, positions=positions_of(self.config),
                                max_new_tokens=max_new_tokens)
        new = self.continue_ids(encoded.ids, max_new_tokens, self.stop_ids)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return {"text": text, "token_ids": new, "prompt_token_ids": encoded.ids}, encoded.notes


def prompt_form(target, *, raw: bool = False) -> PromptForm:
    """How TARGET's training rendered its prompts, read from its record alone (quick: before a
    data file is read and the model loaded). ``raw``: the text as given, whatever the run."""
    from rosafx.io.outputs import EXPORT_MARK
    from rosafx.recipes import options
    from rosafx.recipes.run_model import data_columns
    from rosafx.training.runs import CONFIG, is_run, read_run
    target = Path(target)
    if is_run(target):
        record = read_run(target)
        _check_causal_lm(record["task"], f"{target} trained the {record['task']} task; generate needs a causal-lm "
                                         "run (`rosafx train MODEL --task causal-lm ...`).")
        config = options.checked(record.get("config"), where=str(target / CONFIG))
        columns = data_columns(record, config, target / CONFIG)
    else:
        folder = _export_folder(target)
        info = _export_record(folder)
        columns = data_columns(info, info["reading"], folder / EXPORT_MARK)
    return form_of_columns(columns, where=str(target), raw=raw)


def open_generator(target, form: PromptForm | None = None) -> Generator:
    """``form``: how prompts are rendered (default: ``prompt_form(target)``)."""
    from rosafx.training.runs import is_run
    target = Path(target)
    form = form or prompt_form(target)
    generator = _torch_generator(target) if is_run(target) else _onnx_generator(_export_folder(target))
    return dataclasses.replace(generator, form=form, notes=([form.note] if form.note else []) + generator.notes)


def _check_causal_lm(task: str, message: str) -> None:
    if task != "causal-lm":
        raise RosafxError(message)


def _export_folder(target: Path) -> Path:
    folder = target.parent if target.is_file() else target
    if not folder.is_dir():
        raise RosafxError(f"{folder} is neither a rosafx run directory nor an export folder "
                          "(`rosafx export RUN --merge -o OUT` writes one).")
    return folder


def _export_record(folder: Path) -> dict:
    from rosafx.recipes.run_model import DECODER_NAME, read_export_record
    info = read_export_record(folder)
    _check_causal_lm(info["task"], f"{folder} holds a {info['task']} model; generate needs the export of a "
                                   "causal-lm run.")
    if not (folder / DECODER_NAME).is_file():
        raise RosafxError(f"{folder} has no {DECODER_NAME} (the decoder with its KV cache): export the run again "
                          f"with this version (`rosafx export RUN --merge -o {folder}`).")
    return info


def _vocab(config) -> int:
    return int(config.get_text_config(decoder=True).vocab_size)


def _torch_generator(run_dir: Path) -> Generator:
    import rosafx
    from rosafx.recipes.generation import greedy_with_cache, into_model
    from rosafx.recipes.run_model import open_run_model
    module, adapted, tokenizer, record = open_run_model(run_dir, packed=False)
    model = into_model(module, rosafx.merge(adapted))
    stop, notes = stop_tokens(tokenizer, model.generation_config, _vocab(model.config))
    return Generator(tokenizer, model.config, lambda ids, n, eos: greedy_with_cache(model, ids, n, eos),
                     "torch", stop, notes)


def _onnx_generator(folder: Path) -> Generator:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from rosafx.recipes.onnx_decoding import OnnxDecoder
    from rosafx.recipes.run_model import DECODER_NAME
    _export_record(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        generation = (GenerationConfig.from_pretrained(folder, local_files_only=True)
                      if (folder / "generation_config.json").is_file() else GenerationConfig.from_model_config(config))
    except Exception as exc:  # a damaged or missing file beside the model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RosafxError(f"Cannot read the tokenizer or config in {folder}: {first}. Export the run again.") from exc
    decoder = OnnxDecoder(folder / DECODER_NAME)
    stop, notes = stop_tokens(tokenizer, generation, _vocab(config))
    return Generator(tokenizer, config, decoder.greedy, "onnxruntime", stop, notes)
