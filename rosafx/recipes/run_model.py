"""A RUN's trained model, rebuilt from its record, and its merged ONNX export.

    OUT/model.onnx         merged, verified with onnxruntime against torch
    OUT/config.json        the model's HF config with the run's labels (id2label) and task
    OUT/tokenizer files    the tokenizer the run used
    OUT/rosafx_export.json what was exported from where (marks OUT as rosafx output)

and for a causal-lm run (a decoder), what a runtime needs to generate:

    OUT/model_with_past.onnx   the decoder with KV-cache inputs and outputs (decoder_export.py)
    OUT/generation_config.json the model's generation config (its EOS and pad ids)

model.onnx stays the cache-less graph evaluate scores (one call on whole rows); the
cached one is what `rosafx generate OUT` runs, one call per new token.
"""
from __future__ import annotations

import json
from pathlib import Path

from rosafx.recipes import options, recipe
from rosafx.io.atomic import atomic_directory
from rosafx.io.outputs import EXPORT_MARK, check_output
from rosafx.errors import RosafxError
from rosafx.io.reading import read_json
from rosafx.recipes.data.examples import TASKS
from rosafx.training.runs import ADAPTER, read_run

# how the run read its data: evaluate reads other files the same way
READING_KEYS = ("text_column", "pair_column", "label_column", "prompt_column", "response_column", "messages_column",
                "max_length", "batch_size")
# Examples.columns: which columns the training data was read from, as found (with or without
# flags). run.json and OUT/rosafx_export.json record them as "columns": a causal-lm run's prompt
# form (text, prompt + response, chat) is what `rosafx generate` renders its prompts as.
COLUMN_ROLES = ("text", "pair", "label", "prompt", "response", "messages")
ONNX_NAME = "model.onnx"
DECODER_NAME = "model_with_past.onnx"


def open_run(run_dir):
    """(adapted model with the trained adapter, tokenizer, run record)."""
    _, adapted, tokenizer, record = open_run_model(run_dir)
    return adapted, tokenizer, record


def open_run_model(run_dir, *, packed: bool = True):
    """(the HF model the run adapted, untouched; adapted model; tokenizer; run record).
    ``packed=False`` captures a packed run (--pack) with plain 2-D attention masks, as its
    ONNX export takes them (the packed capture takes a 4-D block-diagonal mask)."""
    import rosafx
    run_dir = Path(run_dir)
    record = read_run(run_dir)
    # run.json is a file like any other: its options go through the same table as flags do
    config = record["config"] = options.checked(record.get("config"), where=str(run_dir / "run.json"))
    if not (run_dir / ADAPTER / "rosafx.json").exists():
        raise RosafxError(f"{run_dir} has no trained adapter yet (the run did not finish): `rosafx train ... "
                          f"-o {run_dir} --resume` completes it.")
    spec = recipe.model_spec(config["model"])
    tokenizer = recipe.open_tokenizer(spec.source)
    inputs = recipe.example_inputs(tokenizer, dict(config, pack=config.get("pack") and packed), pairs=record["pairs"])
    from rosafx.recipes.heads import open_task_model
    import torch
    torch.manual_seed(config["seed"])
    module, _ = open_task_model(spec.source.path, record["task"], record["label_names"])
    adapted = rosafx.load(module, run_dir / ADAPTER, example_inputs=inputs)
    return module, adapted, tokenizer, record


def read_export_record(folder) -> dict:
    """OUT/rosafx_export.json, checked before its values are used (it is a file anyone can edit):
    a damaged one is a one-line error, not a crash later."""
    mark = Path(folder) / EXPORT_MARK
    if not mark.is_file():
        raise RosafxError(f"{folder} has no {EXPORT_MARK}: evaluate reads ONNX written by `rosafx export RUN`.")
    info = read_json(mark, "the export record")
    task, names, reading = info.get("task"), info.get("label_names"), info.get("reading", {})
    bad = None
    if task not in TASKS:
        bad = f"'task' is {task!r}, not one of {TASKS}"
    elif task == "classification" and not (isinstance(names, list) and len(names) >= 2
                                           and all(isinstance(n, str) for n in names)):
        bad = "'label_names' must list the run's class names"
    elif not isinstance(reading, dict) or not set(reading) <= set(READING_KEYS):
        bad = f"'reading' must be an object with keys among {READING_KEYS}"
    if bad:
        raise RosafxError(f"{mark} is damaged: {bad}. Export the run again (`rosafx export RUN -o OUT`).")
    # its reading options go through the options table, as run.json's do
    info["reading"] = options.checked(reading, where=f"{mark}: reading")
    info["columns"] = _checked_columns(info.get("columns"), mark)
    return info


def data_columns(record: dict, config: dict, where) -> dict | None:
    """The columns a run's training data was read from: as recorded ("columns", in run.json or
    the export record), else as its options name them (a record from before "columns" was
    written), else None: found without flags and not recorded."""
    columns = _checked_columns(record.get("columns"), where)
    if columns is not None:
        return columns
    if config.get("messages_column"):
        return {"messages": config["messages_column"]}
    if config.get("prompt_column") and config.get("response_column"):
        return {"prompt": config["prompt_column"], "response": config["response_column"]}
    if config.get("text_column"):
        return {"text": config["text_column"]}
    return None


def _checked_columns(columns, where) -> dict | None:
    if columns is None:
        return None
    if not (isinstance(columns, dict) and set(columns) <= set(COLUMN_ROLES)
            and all(v is None or isinstance(v, str) for v in columns.values())):
        raise RosafxError(f"{where} is damaged: 'columns' must map some of {COLUMN_ROLES} to column names. "
                          "Export (or train) the run again.")
    return columns


def export_run(run_dir, out, *, merge: bool = True, overwrite: bool = False, weights: str | None = None,
               group_size: int | None = None):
    """``weights="int4"|"int8"``: OUT/model.onnx holds the re-quantized merged weights (MatMulNBits)."""
    import rosafx
    from rosafx.passes.onnx_weights import DEFAULT_GROUP_SIZE, check_scheme
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    check_scheme(weights, group_size, merge=merge)
    run_dir, out = Path(run_dir), Path(out)
    record = read_run(run_dir)
    inputs = [run_dir, record["config"]["model"]]
    check_output(out, inputs=inputs, overwrite=overwrite)  # the rule every command follows
    if not merge:
        raise RosafxError("A run exports merged only (adapter ops have no ONNX form): use --merge.")
    module, adapted, tokenizer, record = open_run_model(run_dir, packed=False)
    check_output(out, inputs=inputs, overwrite=overwrite)  # again: it may have changed while the model loaded
    with atomic_directory(out) as tmp:
        report = rosafx.export_onnx(adapted, tmp / ONNX_NAME, merge=True, weights=weights, group_size=group_size)
        report.path = str(out / ONNX_NAME)
        tokenizer.save_pretrained(tmp)
        hf_config = _hf_config(record)
        hf_config.rosafx_task = record["task"]
        hf_config.save_pretrained(tmp)
        if record["task"] == "causal-lm":
            report.decoder = _export_decoder(module, adapted, tmp, out, weights, group_size)
        reading = {k: record["config"].get(k) for k in READING_KEYS}
        columns = data_columns(record, record["config"], run_dir / "run.json")
        (tmp / EXPORT_MARK).write_text(json.dumps({"run": str(run_dir.resolve()), "task": record["task"],
                                                   "label_names": record["label_names"], "pairs": record["pairs"],
                                                   "reading": reading, "columns": columns}, indent=2))
    return report


def _export_decoder(module, adapted, tmp: Path, out: Path, weights: str | None = None, group_size: int | None = None):
    """The KV-cache ONNX of the run's decoder and its generation config, beside model.onnx;
    its weights re-quantized as model.onnx's are (``weights``)."""
    import rosafx
    from rosafx.recipes.decoder_export import export_cached_decoder
    from rosafx.recipes.generation import into_model
    decoder = into_model(module, rosafx.merge(adapted))
    report = export_cached_decoder(decoder, tmp / DECODER_NAME, weights=weights, group_size=group_size)
    report.path = str(out / DECODER_NAME)
    decoder.generation_config.save_pretrained(tmp)
    return report


def _hf_config(record: dict):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(recipe.model_spec(record["config"]["model"]).source.path, local_files_only=True)
    names = record["label_names"]
    if record["task"] == "classification":
        config.num_labels = len(names)
        config.id2label = {i: n for i, n in enumerate(names)}
        config.label2id = {n: i for i, n in enumerate(names)}
        config.problem_type = "single_label_classification"
    elif record["task"] == "regression":
        config.num_labels, config.problem_type = 1, "regression"
    return config
