"""What `rosafx generate TARGET` generates with: a RUN (torch: transformers' greedy
``generate`` with its KV cache, on the user's model carrying the merged weights) or an
export folder (onnxruntime over ``model_with_past.onnx``, one call per new token). Both
encode prompts and choose stop tokens the same way (prompts.py), so their tokens compare."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rosafx.errors import RosafxError
from rosafx.recipes.prompts import encode_prompt, positions_of, stop_tokens


@dataclass
class Generator:
    tokenizer: object
    config: object                      # the model's HF config (positions, vocabulary)
    continue_ids: Callable               # (prompt ids, max new tokens, stop ids) -> new ids
    runtime: str                         # "torch" or "onnxruntime"
    stop_ids: set[int]
    notes: list[str]                     # said once per command (e.g. no EOS token)

    def generate(self, prompt: str, max_new_tokens: int) -> tuple[dict, list[str]]:
        """({"text", "token_ids", "prompt_token_ids"}, notes about this prompt)."""
        encoded = encode_prompt(self.tokenizer, prompt, positions=positions_of(self.config),
                                max_new_tokens=max_new_tokens)
        new = self.continue_ids(encoded.ids, max_new_tokens, self.stop_ids)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return {"text": text, "token_ids": new, "prompt_token_ids": encoded.ids}, encoded.notes


def open_generator(target) -> Generator:
    from rosafx.training.runs import is_run
    target = Path(target)
    if is_run(target):
        return _torch_generator(target)
    folder = target.parent if target.is_file() else target
    return _onnx_generator(folder)


def _vocab(config) -> int:
    return int(config.get_text_config(decoder=True).vocab_size)


def _torch_generator(run_dir: Path) -> Generator:
    import rosafx
    from rosafx.recipes.generation import greedy_with_cache, into_model
    from rosafx.recipes.run_model import open_run_model
    module, adapted, tokenizer, record = open_run_model(run_dir, packed=False)
    if record["task"] != "causal-lm":
        raise RosafxError(f"{run_dir} trained the {record['task']} task; generate needs a causal-lm run "
                          "(`rosafx train MODEL --task causal-lm ...`).")
    model = into_model(module, rosafx.merge(adapted))
    stop, notes = stop_tokens(tokenizer, model.generation_config, _vocab(model.config))
    return Generator(tokenizer, model.config, lambda ids, n, eos: greedy_with_cache(model, ids, n, eos),
                     "torch", stop, notes)


def _onnx_generator(folder: Path) -> Generator:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from rosafx.recipes.onnx_decoding import OnnxDecoder
    from rosafx.recipes.run_model import DECODER_NAME, read_export_record
    if not folder.is_dir():
        raise RosafxError(f"{folder} is neither a rosafx run directory nor an export folder "
                          "(`rosafx export RUN --merge -o OUT` writes one).")
    info = read_export_record(folder)
    if info["task"] != "causal-lm":
        raise RosafxError(f"{folder} holds a {info['task']} model; generate needs the export of a causal-lm run.")
    if not (folder / DECODER_NAME).is_file():
        raise RosafxError(f"{folder} has no {DECODER_NAME} (the decoder with its KV cache): export the run again "
                          f"with this version (`rosafx export RUN --merge -o {folder}`).")
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
