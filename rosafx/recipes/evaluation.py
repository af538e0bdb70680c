"""Score a trained model on a data file: a RUN (the adapted model in torch) or its ONNX
export (onnxruntime), with the same readers, tokenizer, label names and metrics."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rosafx.recipes import recipe
from rosafx.recipes.data import Batches, encode, model_inputs, scores
from rosafx.recipes.data.extractors import exact_match, extractor
from rosafx.recipes.data.metrics import TaskMetrics
from rosafx.recipes.greedy_answers import generation_prompts, greedy_answers
from rosafx.recipes.loading import hf_config
from rosafx.errors import RosafxError
from rosafx.recipes.run_model import ONNX_NAME, open_run, read_export_record
from rosafx.training.runs import is_run


DEFAULT_NEW_TOKENS = 256  # when --extract is given alone


def evaluate_path(target, data, *, progress: bool = True, max_new_tokens: int | None = None,
                  extract: str | None = None) -> dict:
    """The task's metrics; with ``max_new_tokens`` or ``extract`` (causal-lm instruction data, a
    RUN), also the exact match of greedy answers after the extractor (rosafx/recipes/data/extractors.py)."""
    target = Path(target)
    generate = max_new_tokens is not None or extract is not None
    if generate:
        extract_answer = extractor(extract)  # a bad pattern fails before the model loads
        if max_new_tokens is not None and max_new_tokens < 1:
            raise RosafxError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    if is_run(target):
        answers = (max_new_tokens or DEFAULT_NEW_TOKENS, extract_answer) if generate else None
        return _evaluate_run(target, data, progress, answers)
    onnx_file = target / ONNX_NAME if target.is_dir() else target
    if onnx_file.suffix == ".onnx" and onnx_file.exists():
        if generate:
            raise RosafxError("Exact match (--max-new-tokens, --extract) is computed on a RUN: pass the run directory "
                              "instead of its ONNX export.")
        return _evaluate_onnx(onnx_file, data)
    raise RosafxError(f"{target} is neither a rosafx run directory nor an exported model.onnx "
                      "(`rosafx export RUN --merge -o OUT` writes OUT/model.onnx).")


def _evaluate_run(run_dir: Path, data, progress: bool, answers=None) -> dict:
    """The task's metrics; ``answers`` = (max_new_tokens, extractor): exact match of greedy answers too."""
    import rosafx
    adapted, tokenizer, record = open_run(run_dir)
    settings = {**record["config"], "task": record["task"]}
    if answers is not None and record["task"] != "causal-lm":
        raise RosafxError(f"Exact match scores generated answers: {run_dir} was trained on {record['task']}, not "
                          "causal-lm. Drop --max-new-tokens/--extract.")
    examples = recipe.read_examples(data, settings, record["label_names"])
    prompts = None
    if answers is not None:  # before the perplexity pass: a prompt that cannot be answered fails fast
        prompts = generation_prompts(examples, tokenizer, settings["max_length"], answers[0],
                                     recipe.positions_of(hf_config(recipe.model_spec(settings["model"]).source.path)))
    batches = recipe.batches_of(examples, tokenizer, settings, train=False)
    result = {"examples": len(examples),
              **rosafx.evaluate(adapted, batches, metrics=TaskMetrics(record["task"]), progress=progress)}
    if answers is not None:
        result.update(_exact_match(adapted, tokenizer, settings, examples, prompts, *answers, progress))
    return result


def _exact_match(adapted, tokenizer, settings: dict, examples, prompts, max_new_tokens: int, extract_answer,
                 progress: bool) -> dict:
    """Greedy answers from the merged model with its KV cache (generation.into_model), scored by exact match."""
    import rosafx
    from rosafx.recipes.generation import into_model
    from rosafx.recipes.heads import open_task_model
    base, _ = open_task_model(recipe.model_spec(settings["model"]).source.path, "causal-lm", None)
    model = into_model(base, rosafx.merge(adapted))
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, settings["batch_size"], progress)
    return {"exact_match": exact_match(answers, examples.responses, extract_answer), "generated": len(answers),
            "max_new_tokens": max_new_tokens}


def _evaluate_onnx(onnx_file: Path, data) -> dict:
    from transformers import AutoTokenizer
    folder = onnx_file.parent
    info = read_export_record(folder)  # checked: a damaged record is a one-line error
    settings = {**recipe.DEFAULTS, **info.get("reading", {}), "task": info["task"]}
    session = onnx_session(onnx_file)  # before the data is read: a file that is not a model fails fast
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise RosafxError(f"{folder} has no tokenizer that loads ({_first_line(exc)}): evaluate reads the tokenizer "
                          "files `rosafx export RUN` writes beside model.onnx. Export the run again.") from None
    examples = recipe.read_examples(data, settings, info["label_names"])
    batches = Batches(encode(examples, tokenizer, settings["max_length"]), settings["batch_size"])
    classes = len(info["label_names"]) if info["task"] == "classification" else None
    return {"examples": len(examples), **onnx_scores(session, batches, info["task"], classes)}


# the integer types an exported model may take token ids and masks as (the batches hold int64)
INPUT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


def onnx_session(onnx_file: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  (onnxruntime raises its own types for every kind of bad file)
        raise RosafxError(f"{onnx_file} is not a model onnxruntime can load ({_first_line(exc)}). Export the run "
                          "again with `rosafx export RUN --merge -o OUT`.") from None
    for meta in session.get_inputs():
        if meta.type not in INPUT_TYPES:
            raise RosafxError(f"{onnx_file} takes input '{meta.name}' as {meta.type}; evaluate feeds token ids and "
                              f"masks as integers ({', '.join(INPUT_TYPES)}).")
    if not session.get_outputs():
        raise RosafxError(f"{onnx_file} has no outputs.")
    return session


def onnx_scores(session, batches, task: str, classes: int | None = None) -> dict:
    """The task's metrics of an ONNX model (an onnxruntime session, or a path) over labelled batches."""
    if not hasattr(session, "run"):
        session = onnx_session(Path(session))
    metas = session.get_inputs()
    names = [m.name for m in metas]
    logits, labels = [], []
    for batch in batches:
        inputs = model_inputs(batch)
        missing = [n for n in names if n not in inputs]
        if missing:
            raise RosafxError(f"The ONNX model takes inputs {names}; the batches give {sorted(inputs)}.")
        feed = {m.name: inputs[m.name].numpy().astype(INPUT_TYPES[m.type]) for m in metas}
        try:
            out = session.run(None, feed)
        except Exception as exc:  # noqa: BLE001
            raise RosafxError(f"onnxruntime could not run the model on a batch ({_first_line(exc)}). Is it an "
                              "export of a run trained on this task?") from None
        logits.append(torch.from_numpy(np.asarray(out[0], dtype=np.float32)))
        labels.append(batch["labels"])
    if not logits:
        raise RosafxError("The evaluation data has no rows.")
    return {f"eval_{k}": v for k, v in scores(task, logits, labels, classes).items()}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
