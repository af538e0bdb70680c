"""The options of ``rosafx train``, once: each one's name, type, default, allowed values and help.

The command line, a ``--config`` file (YAML or JSON) and ``RUN/run.json`` hold the same keys,
and every value from any of them goes through ``checked`` against this table: a string where a
list is expected, ``NaN`` epochs, a zero batch, a learning rate that overflows or a nested
mapping is a one-line error naming the option and where it came from, before anything runs.
``rosafx train``'s flags are made from this table (``cli/options.flag``: type and help), and
``tests/test_faults_config.py`` checks that the command names every option that has a flag.
The options ``rosafx.fit`` takes too are the training layer's (rosafx/training/options.py:
type and bounds defined once), here with the recipe's defaults and help.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from rosafx.methods import methods_with_option
from rosafx.methods.base import MAX_ALPHA
from rosafx.ops.quantized import MAX_GROUP_SIZE, SCHEMES
from rosafx.recipes.data.examples import TASKS
from rosafx.training.options import BIG, TRAINING_OPTIONS, Option
from rosafx.training.options import checked as checked_against


def training(option: str, **changes) -> Option:
    """The training option ``option`` (rosafx/training/options.py: its type and bounds, once)
    with the recipe's own default, help or name where ``changes`` gives them."""
    return dataclasses.replace(TRAINING_OPTIONS[option], **changes)


TABLE = (
    Option("model", "path", None, "HF model directory, or `rosafx adapt` output"),
    Option("method", "text", None, "Adapter method id (see `rosafx methods`)"),
    Option("target", "texts", None, "Site pattern: exact path, dot-suffix or regex; repeatable. "
           "Default: every linear site except output heads"),
    Option("rank", "int", None, "Adapter rank", low=1, high=BIG),
    Option("alpha", "float", None, f"Scaling numerator ({', '.join(methods_with_option('alpha'))})", low=0,
           high=MAX_ALPHA, low_open=True),
    Option("option", "texts", None, "Extra method option KEY=VALUE (e.g. density=0.01); repeatable"),
    Option("rules", "path", None, "JSON file {pattern: config}; overrides the options above"),
    Option("quantize", "choice", None, "Store the frozen linear weights quantized: nf4 | int4 | int8 (QLoRA: "
           "adapters train on top; modules trained in full stay fp32)", choices=tuple(SCHEMES)),
    Option("quantize_group_size", "int", None, "Weights per quantization scale (default 64; must divide each "
           "layer's columns)", low=2, high=MAX_GROUP_SIZE),
    Option("data", "path", None, "Training data: .tsv (GLUE layouts), .csv, .jsonl, .txt"),
    Option("eval", "path", None, "Evaluation data, same layout"),
    Option("task", "choice", None, "classification | regression | causal-lm (default: from the layout)",
           choices=TASKS),
    Option("text_column", "text", None, "Column with the text"),
    Option("pair_column", "text", None, "Column with the second text of a pair"),
    Option("label_column", "text", None, "Column with the label or score"),
    # causal-lm instruction data (docs/generation.md)
    Option("prompt_column", "text", None, "causal-lm: column with the prompt (loss on the response only)"),
    Option("response_column", "text", None, "causal-lm: column with the response (ends with EOS)"),
    Option("messages_column", "text", None, "causal-lm: column with chat messages [{role, content}, ...], "
           "the last one the assistant's response"),
    Option("pack", "bool", False, "causal-lm: pack short examples into rows of --max-length tokens, attention "
           "kept inside each example (position ids + a block-diagonal mask)"),
    training("max_length", default=128, help="Tokens per example (default 128; at most the model's positions)"),
    training("epochs"),
    training("steps", name="max_steps", help="Optimizer steps (instead of --epochs)"),
    Option("batch_size", "int", 32, "Examples per batch and process (default 32)", low=1, high=BIG),
    training("grad_accum", help="Batches per optimizer step (default 1)"),
    training("lr", default=5e-4, help="Peak learning rate (default 5e-4)"),
    training("warmup_ratio"),
    training("schedule"),
    training("weight_decay"),
    training("eval_every"),
    training("save_every"),
    training("seed", default=0, help="Seed for the head, adapters, shuffling, dropout"),
    training("precision"),
    training("best_metric", help="Keep RUN/best by this metric (default: the task's)"),
    training("calibration_batches", help="Batches a method's calibration reads (see `rosafx methods`)",
             has_flag=False),
    Option("compile", "bool", False, "Train through a compiled step without host syncs: batches padded to "
           "power-of-two lengths, CUDA graphs on a GPU (compile time reported apart; on a CPU leave it off)"),
    training("grad_checkpoint", help="Recompute each layer's activations in the backward "
             "(less memory, more time; a --config file may name the mode: full, attention)"),
    Option("device", "text", "auto", "auto | cpu | cuda | cuda:N (default auto: a GPU when there is one, "
           "its adapter ops on the Triton kernels)"),
)
OPTIONS: dict[str, Option] = {option.name: option for option in TABLE}
DEFAULTS: dict[str, Any] = {option.name: option.default for option in TABLE}


def checked(values: dict, where: str | None = None) -> dict:
    """Every value checked against its option; an unknown key is an error. ``where``: the
    file the values came from (None: the command line)."""
    return checked_against(values, OPTIONS, where)
