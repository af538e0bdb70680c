"""Each tiny model of tests/models.py exported once per test session.

torch.export is most of what capturing a tiny model costs (seconds each, against a tenth of a
second to copy the result), and many tests capture the same factory's model. ``exported(factory)``
exports the factory's model once per session and hands each caller a deep copy of the model
and its ``ExportedProgram`` together: one copy, so the copied program reads the copied
model's parameters, as a fresh export of a fresh model would (``rosafx.transform`` and
``rosafx.load`` take the program where they take a model). Tests of capture itself (what
export does with a model) still export their own.
"""
from __future__ import annotations

import copy
from typing import Callable

from rosafx.graph.capture import export_program, normalize_example_inputs

_SESSION: dict[Callable, tuple] = {}   # factory -> (model, program, example inputs), never handed out


def exported(factory: Callable) -> tuple:
    """(model, program, example inputs) for ``factory``, a fresh copy of the session's one export."""
    if factory not in _SESSION:
        model, example = factory()
        args, kwargs = normalize_example_inputs(model, example)
        _SESSION[factory] = (model, export_program(model, args, kwargs), example)
    return copy.deepcopy(_SESSION[factory])
