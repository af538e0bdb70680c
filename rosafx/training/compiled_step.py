"""``rosafx.fit(..., compile=True)``'s training step: one a GPU can run without waiting on the host.

An eager step on a GPU whose adapter ops are small is host-bound: Python launches kernels
more slowly than the GPU runs them (docs/kernels.md: 4,644 launches, the GPU idle about
60 % of the step). CUDA graphs replay the whole step's kernels from one launch, which needs:

- no host synchronisation inside the step: the loss stays on the device (``CompiledStep``
  returns a tensor; ``rosafx.fit`` reads the losses of several steps at once, at its
  logging points), and nothing reads a tensor's value to decide what runs next;
- static shapes: each batch is padded to one of a few lengths (rosafx/training/static_shapes.py),
  compiled with ``dynamic=False``, so there is one graph per bucket, recorded once;
- an optimizer step that can be captured: AdamW with ``capturable=True`` on CUDA (its step
  count and bias corrections stay tensors) and the learning rate a tensor the schedule
  fills in place (``rosafx.training.optim.adamw(static=...)``), so a new rate is new data,
  not a recompile.

Two compiled functions make the step: ``loss_fn(model, batch)`` (forward, with the backward
AOT autograd derives from it) and the optimizer update (optional clipping + ``step``). The
schedule's step and ``zero_grad`` are host bookkeeping between them. On CUDA with the default
backend they compile with ``mode="reduce-overhead"`` (CUDA graphs). **Not yet run on a GPU**:
on this project's CPU machines the step is checked for host-syncing ops, against the eager
step in float64, and for recompiles (tests/test_compiled_step.py).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from rosafx.errors import RosafxError
from rosafx.training.optim import Optimization
from rosafx.training.static_shapes import StaticShapes

# Graphs one compiled function may hold: a few length buckets, each with full and short rows.
RECOMPILE_LIMIT = 32


def compile_options(backend, device: torch.device) -> dict:
    """torch.compile's keyword arguments for ``fit(compile=backend)``: ``True`` means inductor,
    with CUDA graphs on CUDA; a string or callable names another backend."""
    if backend is True or backend == "inductor":
        mode = "reduce-overhead" if device.type == "cuda" else None
        return {"backend": "inductor", "mode": mode, "dynamic": False}
    return {"backend": backend, "dynamic": False}


class CompiledStep:
    """One optimizer step over ``grad_accum`` batches; returns the mean loss as a device tensor."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 optimization: Optimization, options: dict, *, max_grad_norm: float | None = None,
                 autocast=contextlib.nullcontext, static_shapes: StaticShapes | None = None):
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # DDP's gradient hooks inside a compiled (and CUDA-graphed) step: not built or tested yet
            raise RosafxError("compile=True is not supported with several processes (DDP) yet: train without "
                              "--compile under torchrun / --nproc.")
        self.model, self.loss_fn, self.optimization = model, loss_fn, optimization
        self.max_grad_norm, self.autocast = max_grad_norm, autocast
        self.static_shapes = static_shapes or StaticShapes()
        self.cuda_graphs = options.get("mode") == "reduce-overhead"
        self._loss = torch.compile(self._forward_loss, **options)
        self._update = torch.compile(self._optimizer_update, **options)

    def _forward_loss(self, batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)

    def _optimizer_update(self, optimizer: torch.optim.Optimizer) -> None:
        if self.max_grad_norm:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)   # foreach norm: no host read
        optimizer.step()

    def __call__(self, batches: list) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        total = None
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            for batch in batches:
                with self.autocast():
                    loss = self._loss(self.static_shapes(batch))
                if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                    raise RosafxError("loss_fn(model, batch) must return a scalar tensor.")
                (loss / len(batches)).backward()
                # a new tensor outside the graph: a CUDA graph's output is overwritten by its next replay
                total = loss.detach().clone() if total is None else total.add_(loss.detach())
            optimizer = self.optimization.optimizer
            self._update(optimizer)
        self.optimization.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return total.div_(len(batches))


__all__ = ["CompiledStep", "compile_options", "RECOMPILE_LIMIT"]
