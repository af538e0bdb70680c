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

Opt-in, for an implementation whose forward builds something its backward needs again (a
transient merged weight): ``implement(..., forward_saving=f)`` with ``f(*args) -> (y, extras)``
(a tuple of tensors). When a gradient will follow (grad mode on and some tensor argument
requires grad), the op runs ``f`` instead of ``forward``, the extras are saved beside the
arguments, and the backward is called as ``backward(dy, needs, *args, saved=extras)``
(``kept_for_backward`` is the rule the torch ops use: a weight no larger than x).
Whenever no extras reach the backward (under torch.compile or export the forward runs on
fake tensors; grad mode off), it is called without ``saved``, exactly as an implementation
without the opt-in, so it must also work from the arguments alone.

Each op names the roles of its arguments (``op_spec(roles={"input": "x", "weight": "weight",
...})``: role -> argument name, the vocabulary in rosafx/ops/roles.py), checked against the
stub's parameters when declared; passes read a node's arguments by role, never by position.
An op whose Triton implementation lives outside rosafx/kernels (beside its method) names that
module, ``op_spec(kernels="package.module")``, and ``rosafx.lower`` imports it with the others.

``implement(..., opaque_backward=True)`` (the Triton implementations): a backward that
launches kernels cannot be traced on fake tensors, so the spec also registers
``rosafx::<name>_<backend>_backward`` (dy, needs, *args) -> the gradients asked for, an op
torch.compile keeps whole; the wiring calls it only while compiling (eager calls the
function directly: one dispatch less per step).
"""
from __future__ import annotations

import inspect
import threading
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

REFERENCE = "torch"
SPECS: dict[str, "OpSpec"] = {}  # op name -> spec


def rows(t: Tensor) -> Tensor:
    """Every leading dim flattened: (…, features) -> (N, features)."""
    return t.reshape(-1, t.shape[-1])


def kept_for_backward(transient: Optional[Tensor], x: Tensor) -> tuple:
    """The extras a ``forward_saving`` hands on: its transient weight when it is no larger
    than x, which the op saves anyway (keeping it costs at most x's memory again), else
    nothing (the backward builds it again)."""
    return (transient,) if transient is not None and transient.numel() <= x.numel() else ()


def linear_output_like(x: Tensor, weight: Tensor, *rest) -> Tensor:
    """The fake of every op shaped like F.linear(x, weight): (…, out) in x's dtype."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _Handoff(threading.local):
    """The extras of the last ``forward_saving`` call on this thread, for the ``setup_context``
    that custom_op's autograd runs right after the forward: keyed by the output's identity
    (held weakly), so anything that is not that very call's output gets nothing and the
    backward rebuilds. Were a call not followed by its setup_context (``_gradient_follows``
    wrong), its extras would stay here until the next call: one set per thread at most."""
    output: Optional[weakref.ref] = None
    extras: tuple = ()

    def put(self, output: Tensor, extras: tuple) -> None:
        self.output, self.extras = weakref.ref(output), tuple(extras)

    def take(self, output) -> Optional[tuple]:
        found = self.extras if self.output is not None and self.output() is output else None
        self.output, self.extras = None, ()
        return found


_HANDOFF = _Handoff()


def _gradient_follows(args) -> bool:
    """Whether custom_op's autograd will run setup_context after this kernel call: some tensor
    argument requires grad and the kernel runs inside its autograd.Function's forward, which
    turns forward-mode AD off too (torch.no_grad and inference_mode calls reach the kernel
    with it on, or in inference mode)."""
    if torch._C._is_fwd_grad_enabled() or torch.is_inference_mode_enabled():
        return False
    for value in args:
        if isinstance(value, Tensor) and value.requires_grad:
            return True
        if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) and v.requires_grad for v in value):
            return True
    return False


def argument_positions(stub: Callable, roles: dict[str, str]) -> dict[str, int]:
    """role -> the position of the argument it names in ``stub``'s parameters."""
    names = list(inspect.signature(stub).parameters)
    missing = {role: name for role, name in roles.items() if name not in names}
    if missing:
        raise ValueError(f"op {stub.__name__}: roles {missing} name no argument of ({', '.join(names)})")
    return {role: names.index(name) for role, name in roles.items()}


class OpSpec:
    def __init__(self, stub: Callable, fake: Callable = linear_output_like, roles: Optional[dict] = None,
                 kernels: Optional[str] = None):
        self.name = stub.__name__
        self.kernels = kernels  # the module that plugs in the Triton implementation, if not in rosafx/kernels
        self.roles = argument_positions(stub, roles or {})  # role -> argument position
        self.doc = inspect.getdoc(stub) or ""
        self.schema = torch.library.infer_schema(stub, mutates_args=())
        self.n_args = len(inspect.signature(stub).parameters)
        self.signature = inspect.signature(stub)  # for implement_visible's triton_op (schema from a signature)
        self.fake = fake
        self.ops: dict[str, torch._ops.OpOverload] = {}  # backend -> registered op (.default)

    def op_name(self, backend: str) -> str:
        return self.name if backend == REFERENCE else f"{self.name}_{backend}"

    def implement(self, backend: str, forward: Callable, backward: Callable, *,
                  forward_saving: Optional[Callable] = None, opaque_backward: bool = False):
        """Register ``forward`` / ``backward`` as this op's ``backend`` implementation; returns
        the op overload (``torch.ops.rosafx.<name>[_backend].default``). ``forward_saving``:
        the opt-in of the module docstring."""
        name = self.op_name(backend)
        if backend in self.ops:
            return self.ops[backend]
        kernel = forward
        if forward_saving is not None:
            def kernel(*args):
                if not _gradient_follows(args):
                    return forward(*args)
                y, extras = forward_saving(*args)
                _HANDOFF.put(y, extras)
                return y
            kernel.__name__, kernel.__doc__ = forward.__name__, forward.__doc__
        op = torch.library.custom_op(f"rosafx::{name}", kernel, mutates_args=(), schema=self.schema)
        op.register_fake(self.fake)
        traced = self._opaque_backward(name, backward) if opaque_backward else None
        op.register_autograd(self._backward(backward, traced), setup_context=self._setup)
        self.ops[backend] = getattr(torch.ops.rosafx, name).default
        return self.ops[backend]

    def implement_visible(self, backend: str, forward: Callable, backward: Callable):
        """Register ``forward`` / ``backward`` as a ``torch.library.triton_op`` (CUDA Triton
        implementations, rosafx/kernels): torch.compile traces into ``forward`` and sees its
        kernels (launched through ``torch.library.wrap_triton`` while compiling) instead of one
        opaque node, so inductor can schedule them and CUDA graphs capture them. The backward
        is the spec's wiring, traced as well (no opaque backward op). Eager calls run the
        kernels directly. Not for TRITON_INTERPRET=1: tracing would hand the interpreter fake
        tensors (docs/kernels.md), so there the opaque ``implement(..., opaque_backward=True)``
        stays."""
        name = self.op_name(backend)
        if backend in self.ops:
            return self.ops[backend]

        def kernel(*args, **kwargs):
            return forward(*args, **kwargs)
        kernel.__name__, kernel.__doc__ = forward.__name__, forward.__doc__
        kernel.__signature__ = self.signature          # triton_op infers the op's schema from it
        op = torch.library.triton_op(f"rosafx::{name}", kernel, mutates_args=())
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
        extras = _HANDOFF.take(output)
        ctx.layout = layout
        ctx.n_extras = None if extras is None else len(extras)
        ctx.save_for_backward(*tensors, *(extras or ()))

    def _opaque_backward(self, name: str, backward: Callable) -> Callable:
        """``rosafx::<name>_backward(dy, needs, *args) -> Tensor[]``: the gradients of the tensor
        arguments that ``needs`` asks for, in order (zeros where the implementation has none)."""
        arguments = self.schema[self.schema.index("(") + 1: self.schema.rindex(") ->")]

        def asked(needs, args):
            return [i for i, (need, value) in enumerate(zip(needs, args)) if need and isinstance(value, Tensor)]

        def run(dy, needs, *args):
            grads = backward(dy, tuple(needs), *args)
            return [grads[i] if grads[i] is not None else torch.zeros_like(args[i]) for i in asked(needs, args)]

        def fake(dy, needs, *args):
            return [torch.empty_like(args[i]) for i in asked(needs, args)]

        op = torch.library.custom_op(f"rosafx::{name}_backward", run, mutates_args=(),
                                     schema=f"(Tensor dy, bool[] needs, {arguments}) -> Tensor[]")
        op.register_fake(fake)
        backward_op = getattr(torch.ops.rosafx, f"{name}_backward").default

        def traced(dy, needs, *args):
            grads = [None] * len(args)
            for i, grad in zip(asked(needs, args), backward_op(dy, list(needs), *args)):
                grads[i] = grad
            return grads
        return traced

    def _backward(self, backward: Callable, traced: Optional[Callable] = None) -> Callable:
        n_args = self.n_args

        def wired(ctx, dy):
            saved = ctx.saved_tensors
            args = [entry[1] if isinstance(entry, tuple) else
                    list(saved[entry]) if isinstance(entry, slice) else saved[entry] for entry in ctx.layout]
            needs = (tuple(ctx.needs_input_grad) + (False,) * n_args)[:n_args]
            if traced is not None and torch.compiler.is_compiling():
                grads = tuple(traced(dy, needs, *args))
            elif ctx.n_extras is None:
                grads = tuple(backward(dy, needs, *args))
            else:
                grads = tuple(backward(dy, needs, *args, saved=tuple(saved[len(saved) - ctx.n_extras:])))
            return (grads + (None,) * n_args)[: len(ctx.needs_input_grad)]

        wired.__doc__ = self.doc
        return wired


OPAQUE = "opaque"  # the backend name of a routed op's custom op (``implement_routed``)
_ROUTED_LIBRARY = torch.library.Library("rosafx", "FRAGMENT")  # the routed ops' definitions


def implement_routed(spec: OpSpec, backend: str, forward: Callable, backward: Callable, *,
                     choose: Callable, **options):
    """Register ``spec``'s ``backend`` op as a router between two ways to run the same math:

    * a composite ``f(*args) -> y`` in plain aten ops, which autograd differentiates in C++: no
      Python runs in the backward, and the forward's Python is the router and a few aten calls;
    * the custom op ``rosafx::<name>_opaque`` (``implement(OPAQUE, forward, backward, **options)``:
      an autograd.Function with the implementation's own backward, one op under dispatch).

    ``choose(*args)`` picks per call (from shapes and dtypes): the composite to run, or None for
    the opaque op; every route must give the same values and gradients. The router is the
    op's CompositeImplicitAutograd kernel, so the graph keeps one node per site whose target
    is ``rosafx::<name>`` (passes see it as before),
    and under torch.compile or export the node decomposes into the route it picks. The op's
    arguments after the last one given are absent from the call when they hold their default
    (the dispatcher drops them): both routes take them as optional parameters."""
    opaque = spec.implement(OPAQUE, forward, backward, **options)
    name = spec.op_name(backend)
    if backend in spec.ops:
        return spec.ops[backend]
    _ROUTED_LIBRARY.define(name + spec.schema)

    def route(*args):
        composite = choose(*args)
        return opaque(*args) if composite is None else composite(*args)
    route.__name__, route.__doc__ = f"{name}_route", spec.doc
    _ROUTED_LIBRARY.impl(name, route, "CompositeImplicitAutograd")
    spec.ops[backend] = getattr(torch.ops.rosafx, name).default
    return spec.ops[backend]


def op_spec(stub: Optional[Callable] = None, *, fake: Callable = linear_output_like, roles: Optional[dict] = None,
            kernels: Optional[str] = None):
    """Declare an op from its typed stub (see the module docstring); usable bare or with
    ``fake=``, ``roles=`` (role -> argument name) and ``kernels=`` (its Triton module)."""
    def declare(fn: Callable) -> OpSpec:
        spec = OpSpec(fn, fake, roles, kernels)
        SPECS[spec.name] = spec
        return spec
    return declare(stub) if stub is not None else declare


def implementations(backend: str) -> dict:
    """reference op -> the op of ``backend``, for every spec with such an implementation."""
    return {spec.ops[REFERENCE]: spec.ops[backend] for spec in SPECS.values()
            if REFERENCE in spec.ops and backend in spec.ops}
