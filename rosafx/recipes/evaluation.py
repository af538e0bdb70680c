"""Score a trained model on a data file: a RUN (the adapted model in torch) or its ONNX
export (onnxruntime), with the same readers, tokenizer, label names and metrics."""
from __future__ import annotations

from pathlib import Path

import torch

from rosafx.io.reading import read_json
from rosafx.recipes import options, recipe
from rosafx.recipes.data import Batches, encode, model_inputs, scores
from rosafx.recipes.data.metrics import TaskMetrics
from rosafx.errors import RosafxError
from rosafx.recipes.run_model import EXPORT_MARK, ONNX_NAME, open_run
from rosafx.training.runs import is_run


def evaluate_path(target, data, *, progress: bool = True) -> dict:
    target = Path(target)
    if is_run(target):
        return _evaluate_run(target, data, progress)
    onnx_file = target / ONNX_NAME if target.is_dir() else target
    if onnx_file.suffix == ".onnx" and onnx_file.exists():
        return _evaluate_onnx(onnx_file, data)
    raise RosafxError(f"{target} is neither a rosafx run directory nor an exported model.onnx "
                      "(`rosafx export RUN --merge -o OUT` writes OUT/model.onnx).")


def _evaluate_run(run_dir: Path, data, progress: bool) -> dict:
    import rosafx
    adapted, tokenizer, record = open_run(run_dir)
    settings = {**record["config"], "task": record["task"]}
    examples = recipe.read_examples(data, settings, record["label_names"])
    batches = Batches(encode(examples, tokenizer, settings["max_length"]), settings["batch_size"])
    result = rosafx.evaluate(adapted, batches, metrics=TaskMetrics(record["task"]), progress=progress)
    return {"examples": len(examples), **result}


def _evaluate_onnx(onnx_file: Path, data) -> dict:
    from transformers import AutoTokenizer
    folder = onnx_file.parent
    mark = folder / EXPORT_MARK
    if not mark.exists():
        raise RosafxError(f"{folder} has no {EXPORT_MARK}: evaluate reads ONNX written by `rosafx export RUN`.")
    info = read_json(mark, "what rosafx export wrote")
    # its reading options go through the options table, as run.json's do
    settings = {**recipe.DEFAULTS, **options.checked(info.get("reading", {}), where=str(mark)), "task": info["task"]}
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    examples = recipe.read_examples(data, settings, info["label_names"])
    batches = Batches(encode(examples, tokenizer, settings["max_length"]), settings["batch_size"])
    return {"examples": len(examples), **onnx_scores(onnx_file, batches, info["task"])}


def onnx_scores(onnx_file, batches, task: str) -> dict:
    """The task's metrics of an ONNX model (onnxruntime, CPU) over labelled batches."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    logits, labels = [], []
    for batch in batches:
        inputs = model_inputs(batch)
        missing = [n for n in names if n not in inputs]
        if missing:
            raise RosafxError(f"The ONNX model takes inputs {names}; the batches give {sorted(inputs)}.")
        out = session.run(None, {n: inputs[n].numpy() for n in names})
        logits.append(torch.from_numpy(out[0]).float())
        labels.append(batch["labels"])
    return {f"eval_{k}": v for k, v in scores(task, logits, labels).items()}
