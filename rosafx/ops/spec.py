"""One spec per adapter op: schema, fake and autograd wiring declared once; implementations plug in.

An op is declared by a typed stub whose docstring holds the op's math and its gradients::

    @op_spec
    def lowrank_linear(x: Tensor, weight: Tensor, ..., x_a: Optional[Tensor] = None) -> Tensor:
        '''y = x·Wᵀ + b + scale·(x_a·Aᵀ)·Bᵀ ... dx = dy·W + g·A ...'''

The stub gives the schema (``torch.library.infer_schema``); the spec adds the fake (shape
only, for export; ``fake=`` when the output is not shaped like ``F.linear(x, weight)``) and
the autograd wiring, the same for every implementation: every tensor argument is saved
(non-tensors ride on ctx) and the backward hands ``dy``, which arguments want a gradient,
and the arguments themselves to the implementation. An implementation is two plain
functions over the op's arguments::

    forward(*args) -> y
    backward(dy, needs, *args) -> one gradient (or None) per argument

``spec.implement("torch", forward, backward)`` registers ``rosafx::<name>`` (the reference,
any device); ``spec.implement("triton", ...)`` registers ``rosafx::<name>_triton``.
``rosafx.lower`` only moves a node between the implementations of one spec.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import Tensor

REFERENCE = "torch"
SPECS: dict[str, "OpSpec"] = {}  # op name -> spec


def rows(t: Tensor) -> Tensor:
    """Every leading dim flattened: (…, features) -> (N, features)."""
    return t.reshape(-1, t.shape[-1])


def linear_output_like(x: Tensor, weight: Tensor, *rest) -> Tensor:
    """The fake of every op shaped like F.linear(x, weight): (…, out) in x's dtype."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class OpSpec:
    def __init__(self, stub: Callable, fake: Callable = linear_output_like):
        self.name = stub.__name__
        self.doc = inspect.getdoc(stub) or ""
        self.schema = torch.library.infer_schema(stub, mutates_args=())
        self.n_args = len(inspect.signature(stub).parameters)
        self.fake = fake
        self.ops: dict[str, torch._ops.OpOverload] = {}  # backend -> registered op (.default)

    def op_name(self, backend: str) -> str:
        return self.name if backend == REFERENCE else f"{self.name}_{backend}"

    def implement(self, backend: str, forward: Callable, backward: Callable):
        """Register ``forward`` / ``backward`` as this op's ``backend`` implementation; returns
        the op overload (``torch.ops.rosafx.<name>[_backend].default``)."""
        name = self.op_name(backend)
        if backend in self.ops:
            return self.ops[backend]
        op = torch.library.custom_op(f"rosafx::{name}", forward, mutates_args=(), schema=self.schema)
        op.register_fake(self.fake)
        op.register_autograd(self._backward(backward), setup_context=self._setup)
        self.ops[backend] = getattr(torch.ops.rosafx, name).default
        return self.ops[backend]

    def _setup(self, ctx, inputs, output) -> None:
        inputs = (tuple(inputs) + (None,) * self.n_args)[: self.n_args]
        tensors, layout = [], []
        for value in inputs:                       # tensors saved, lists of tensors flattened
            if isinstance(value, Tensor):
                layout.append(len(tensors))
                tensors.append(value)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
                layout.append(slice(len(tensors), len(tensors) + len(value)))
                tensors.extend(value)
            else:
                layout.append(("value", value))
        ctx.layout = layout
        ctx.save_for_backward(*tensors)

    def _backward(self, backward: Callable) -> Callable:
        n_args = self.n_args

        def wired(ctx, dy):
            saved = ctx.saved_tensors
            args = [entry[1] if isinstance(entry, tuple) else
                    list(saved[entry]) if isinstance(entry, slice) else saved[entry] for entry in ctx.layout]
            needs = (tuple(ctx.needs_input_grad) + (False,) * n_args)[:n_args]
            grads = tuple(backward(dy, needs, *args))
            return (grads + (None,) * n_args)[: len(ctx.needs_input_grad)]

        wired.__doc__ = self.doc
        return wired


def op_spec(stub: Optional[Callable] = None, *, fake: Callable = linear_output_like):
    """Declare an op from its typed stub (see the module docstring); usable bare or with ``fake=``."""
    def declare(fn: Callable) -> OpSpec:
        spec = OpSpec(fn, fake)
        SPECS[spec.name] = spec
        return spec
    return declare(stub) if stub is not None else declare


def implementations(backend: str) -> dict:
    """reference op -> the op of ``backend``, for every spec with such an implementation."""
    return {spec.ops[REFERENCE]: spec.ops[backend] for spec in SPECS.values()
            if REFERENCE in spec.ops and backend in spec.ops}
