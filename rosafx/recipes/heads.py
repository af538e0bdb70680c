"""Give a Hugging Face model the head of a task, or say why its head does not fit.

A base encoder or decoder (``BertModel``), or one with a pre-training head (``...ForMaskedLM``,
``...ForPreTraining``), gets a fresh head: sequence classification (``num_labels`` = the
data's classes), regression (one output), or a causal LM head. A model that already has a
task head keeps it when it fits the data, and is refused when it does not."""
from __future__ import annotations

from pathlib import Path

from rosafx.errors import RosafxError
from rosafx.recipes.loading import hf_config, hf_pretrained

HEAD_SUFFIXES = {"ForSequenceClassification": "sequence", "ForCausalLM": "causal", "LMHeadModel": "causal"}
PRETRAINING_SUFFIXES = ("ForMaskedLM", "ForPreTraining", "Model")
NEW_HEAD_MODULES = ("classifier", "score")  # where transformers puts a fresh sequence-classification head


def head_kind(architecture: str) -> str | None:
    """'sequence', 'causal', None (a base or pre-training head: a fresh head is added), or 'other'."""
    for suffix, kind in HEAD_SUFFIXES.items():
        if architecture.endswith(suffix):
            return kind
    return None if architecture.endswith(PRETRAINING_SUFFIXES) or not architecture else "other"


def check_task_fits(directory, task: str, label_names: list[str] | None):
    """The model's config and head kind, or a RosafxError saying why the task does not fit."""
    config = hf_config(directory)
    architecture = (getattr(config, "architectures", None) or [""])[0]
    kind = head_kind(architecture)
    num_labels = 1 if task == "regression" else len(label_names or [])
    if task == "causal-lm" and kind not in (None, "causal"):
        raise RosafxError(f"{directory} is a {architecture}: its head does not predict tokens, so it cannot train "
                          "the causal-lm task. Use a base or causal LM model (e.g. GPT-2, Llama).")
    if task != "causal-lm" and kind == "sequence" and config.num_labels != num_labels:
        raise RosafxError(f"{directory} has a {architecture} head with {config.num_labels} outputs, but the "
                          f"{task} data needs {num_labels} ({label_names or 'one score'}). Use its base model "
                          "(a fresh head is added) or data with its classes.")
    if kind == "other":
        raise RosafxError(f"{directory} is a {architecture}, whose head does not fit {task}; use its base model.")
    return config, kind


def open_task_model(directory, task: str, label_names: list[str] | None):
    """(model in eval mode, whether its head is new). Seed torch first for a repeatable head."""
    import transformers
    directory = Path(directory)
    config, kind = check_task_fits(directory, task, label_names)
    num_labels = 1 if task == "regression" else len(label_names or [])
    if task == "causal-lm":
        model = _load(transformers.AutoModelForCausalLM, directory)
        check_sees_no_future(model, directory)
        return model, kind is None
    if kind == "sequence":
        return _load(transformers.AutoModelForSequenceClassification, directory), False
    id2label = {i: name for i, name in enumerate(label_names)} if label_names else {0: "score"}
    extra = {"num_labels": num_labels, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()},
             "problem_type": "regression" if task == "regression" else "single_label_classification"}
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        extra["pad_token_id"] = config.eos_token_id  # decoders find the last token by the pad id
    return _load(transformers.AutoModelForSequenceClassification, directory, **extra), True


def _load(auto_class, directory: Path, **extra):
    """Through loading.hf_pretrained, the checks adapt and inspect use: safetensors only (train,
    evaluate and export of a RUN take no --trust-pickle), clear errors for damaged weights."""
    import transformers
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialised head" is what we asked for
    try:
        return hf_pretrained(auto_class, directory, **extra)
    finally:
        transformers.logging.set_verbosity(verbosity)


def check_sees_no_future(model, directory) -> None:
    """A causal LM predicts each token from the ones before it. A bidirectional encoder (BERT
    without ``is_decoder``) given a causal LM head sees the token it predicts and learns
    nothing useful: refuse it. Asked of the model itself, whatever its type: the first
    positions' logits must not change when only the last token does."""
    import torch
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]]) % int(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    if not torch.allclose(logits[0, :3], logits[1, :3], rtol=1e-4, atol=1e-4):
        raise RosafxError(f"{directory} holds a bidirectional model ({type(model).__name__}): each position sees "
                          "the tokens after it, so it cannot train the causal-lm task. Use a decoder (e.g. GPT-2, "
                          "Llama), or an encoder that has a decoder mode with \"is_decoder\": true in its config.json.")


def new_head_paths(model) -> list[str]:
    names = {name for name, _ in model.named_modules()}
    return [name for name in NEW_HEAD_MODULES if name in names]
