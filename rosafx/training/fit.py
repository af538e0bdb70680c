"""``rosafx.fit``: train an adapted model, method-aware, with evaluation, checkpoints and
exact resume. The loop is a few small pieces that another loop (DDP, a Trainer callback)
can reuse: ``Optimization`` (rosafx/training/optim.py), ``train_step``, ``evaluate``,
``Lifecycles`` (rosafx/training/lifecycle.py), ``capture_state``/``restore_state``
(rosafx/training/checkpoint.py), ``Run`` (rosafx/training/runs.py). There is no per-method code here: what a
method needs while training comes from its ``Lifecycle``.

A batch is whatever ``loss_fn(model, batch)`` takes (tensors inside dicts, tuples or lists
are moved to the model's device). ``train_batches`` must be iterable more than once (a
list, a DataLoader, ``rosafx.recipes.data.Batches``); if it has ``set_epoch(epoch)`` it is called
before each epoch, as for a DistributedSampler, so the order can change per epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import statistics
import time
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from rosafx.passes.bank import unbank_adapters
from rosafx.training.checkpoint import capture_state, restore_state
from rosafx.errors import RosafxError
from rosafx.training.lifecycle import Lifecycles
from rosafx.methods.base import TrainingContext
from rosafx.training.optim import Optimization, adamw, lr_factor, trainable_parameters
from rosafx.training.options import TRAINING_OPTIONS, checked
from rosafx.training.runs import Run

LossFn = Callable[[nn.Module, Any], torch.Tensor]
LOG_EVERY_COMPILED = 10   # compiled steps between loss reads (each read waits for the device)
Metrics = Callable[[nn.Module, Iterable], dict]


@dataclasses.dataclass
class History:
    steps: list[dict]                 # {"step", "epoch", "loss", "lr", "time"} per optimizer step
    evals: list[dict]                 # {"step", "eval_loss", ...} per evaluation
    best: dict | None = None          # the evaluation with the best ``best_metric``
    compile_seconds: float | None = None  # compile=True: first step's wall time less a later step's median
    step_seconds: float | None = None     # median wall time of the steps after the first


def fit(adapted: fx.GraphModule, train_batches: Iterable, loss_fn: LossFn, *,
        eval_batches: Iterable | None = None, metrics: Metrics | None = None,
        steps: int | None = None, epochs: float | None = None,
        optimizer: Callable[[list], torch.optim.Optimizer] | None = None, lr: float = 1e-3,
        weight_decay: float = 0.0, schedule: str = "linear", warmup_ratio: float = 0.0,
        grad_accum: int = 1, max_grad_norm: float | None = None, precision: str = "fp32",
        eval_every: int | None = None, save_every: int | None = None, run=None, resume: bool = False,
        best_metric: str | None = None, calibration_batches: int = 8, seed: int | None = None,
        compile: bool | str | Callable = False, grad_checkpoint: bool | str = False, log_every: int | None = None,
        max_length: int | None = None, progress: bool = True) -> History:
    """Train ``adapted`` for ``steps`` optimizer steps (or ``epochs`` passes over
    ``train_batches``); ``loss_fn(model, batch)`` returns a scalar. ``optimizer`` builds
    one from a parameter list (default AdamW(lr, weight_decay)); the LR follows
    ``schedule`` after ``warmup_ratio`` of the steps. ``metrics(model, eval_batches)``
    returns a dict (default: the mean ``loss_fn``), every ``eval_every`` steps and at the
    end. With ``run`` (a directory), the run logs ``metrics.jsonl``, checkpoints every
    ``save_every`` steps and at the end, keeps the adapter (and the best by ``best_metric``),
    and ``resume=True`` continues exactly from its last checkpoint. Each method's life
    cycle (calibration, resampling, masks) runs at its own events. ``compile=True`` fuses
    sibling adapters (``rosafx.fuse_siblings``, in place) and trains through a step with no
    host synchronisation in it (rosafx/training/compiled_step.py): ``loss_fn`` and the
    optimizer update compiled with static shapes (dict batches with an ``attention_mask``
    padded to power-of-two lengths up to ``max_length``, rosafx/training/static_shapes.py),
    AdamW with a tensor learning rate (capturable on CUDA), and CUDA graphs on CUDA
    (``mode="reduce-overhead"``); a string or callable names another torch.compile backend
    (e.g. ``"aot_eager"``). Losses stay on the device and are read every ``log_every`` steps
    (default 1 eager, 10 compiled) and before each evaluation and checkpoint: ``History.steps``
    still has every step's loss. The first step's compilation is reported apart from the step
    time (``History.compile_seconds``, ``History.step_seconds``). ``grad_checkpoint=True`` recomputes each layer's activations in
    the backward instead of keeping them (``rosafx.training.activation_checkpointing``; training steps only;
    ``"attention"`` keeps the attention kernels' outputs). Every setting is checked against its
    option in rosafx/training/options.py (type and bounds) before anything runs."""
    checked({name: value for name, value in locals().items() if name in TRAINING_OPTIONS}, TRAINING_OPTIONS,
            where="rosafx.fit")
    total = total_steps(train_batches, steps, epochs, grad_accum)
    if compile:
        unbank_adapters(adapted)  # a step compiled whole (fullgraph) reads each adapter tensor as its own Parameter
    run = Run(run) if run is not None and not isinstance(run, Run) else run
    device = next(iter(trainable_parameters(adapted)), torch.empty(0)).device
    log_every = log_every or (LOG_EVERY_COMPILED if compile else 1)
    optimization = Optimization(optimizer or adamw(lr, weight_decay, static=device if compile else None),
                                lr_factor(schedule, total, int(warmup_ratio * total)))
    lifecycles = Lifecycles(adapted)
    loop = {"step": 0, "epoch": 0, "position": 0, "time": 0.0, "best": None}
    history = History([], [])
    if resume:
        loop, history = _resume(adapted, run, optimization, lifecycles)
    else:
        if run is not None and run.checkpoints():
            raise RosafxError(f"{run.path} holds checkpoints of an earlier run: resume=True continues it; use a new "
                              "directory to start again.")
        if seed is not None:
            torch.manual_seed(seed)
            random.seed(seed)
        optimization.build(adapted)
    ctx = TrainingContext(model=adapted, optimizer=optimization.optimizer, loss_fn=loss_fn, step=loop["step"],
                          total_steps=total, steps_per_epoch=_steps_per_epoch(train_batches, grad_accum),
                          calibration_batches=lambda: _on_device(islice(iter(train_batches), calibration_batches),
                                                                 device))

    def rebuild_optimizer() -> None:
        optimization.rebuild(adapted)
        ctx.optimizer = optimization.optimizer
    ctx.rebuild_optimizer = rebuild_optimizer

    adapted.train()
    checkpointed = _grad_checkpointed(adapted, compile, grad_checkpoint)  # before calibration: fail early
    lifecycles.before_training(ctx)
    autocast = _autocast(precision, device)
    step_model = checkpointed if checkpointed is not None else adapted
    compiled_step = (_compiled_step(adapted, loss_fn, optimization, compile, device, max_grad_norm, autocast,
                                    max_length) if compile else None)
    step_walls: list[float] = []
    unread: list[dict] = []   # records whose loss is still a device tensor

    def read_losses() -> None:
        """One host read for every unread step's loss, then log them in order."""
        if not unread:
            return
        losses = _read([r["loss"] for r in unread])
        for record, loss in zip(unread, losses):
            record["loss"] = loss
            _check_finite(loss, record["step"])
            history.steps.append(record)
            if run is not None:
                run.log(record)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{unread[-1]['lr']:.2e}", refresh=False)
        unread.clear()

    stream = BatchStream(train_batches, loop["epoch"], loop["position"])
    started = time.perf_counter() - loop["time"]
    bar = tqdm(total=total, initial=loop["step"], desc="rosafx train", unit="step", disable=not progress)
    try:
        while loop["step"] < total:
            batches = stream.take(grad_accum, device)
            epoch = stream.taken_epoch
            step_started = time.perf_counter()
            if compiled_step is not None:
                loss = compiled_step(batches)      # a device tensor: read at the next logging point
            else:
                loss = train_step(step_model, batches, loss_fn, optimization, max_grad_norm, autocast)
            step_walls.append(time.perf_counter() - step_started)
            loop["step"] += 1
            ctx.step = loop["step"]
            lifecycles.after_step(ctx)
            loop.update(epoch=stream.epoch, position=stream.position, time=time.perf_counter() - started)
            unread.append({"step": loop["step"], "epoch": epoch, "loss": loss, "lr": optimization.lr(),
                           "time": round(loop["time"], 3)})
            bar.update(1)
            last = loop["step"] == total
            evaluating = eval_batches is not None and (last or (eval_every and loop["step"] % eval_every == 0))
            saving = run is not None and (last or (save_every and loop["step"] % save_every == 0))
            if evaluating or saving or loop["step"] % log_every == 0:
                read_losses()
            if evaluating:
                _evaluate_and_keep(adapted, eval_batches, loss_fn, metrics, loop, history, run, best_metric,
                                   progress, device)
            if saving:
                run.save_checkpoint(loop["step"], adapted, capture_state(loop, optimization, lifecycles))
    finally:
        bar.close()
    read_losses()
    if run is not None:
        run.save_adapter(adapted)
        run.plot()
    history.best = loop["best"]
    if len(step_walls) > 1:
        history.step_seconds = statistics.median(step_walls[1:])
    if compile and step_walls:
        history.compile_seconds = step_walls[0] - (history.step_seconds or 0.0)
    return history


def _grad_checkpointed(adapted: fx.GraphModule, compile: bool | str, grad_checkpoint: bool | str) -> nn.Module | None:
    """The per-layer checkpointed training view of ``adapted`` when asked for, else None."""
    if not grad_checkpoint:
        return None
    if compile:
        raise RosafxError("compile and grad_checkpoint cannot be combined yet; choose one.")
    from rosafx.training.activation_checkpointing import grad_checkpointed
    return grad_checkpointed(adapted, grad_checkpoint)


def _compiled_step(adapted: fx.GraphModule, loss_fn, optimization, compile, device, max_grad_norm, autocast,
                   max_length):
    """Sibling fusion, then the step of rosafx/training/compiled_step.py. Lifecycle events that
    change the graph or swap parameters (resample, masks) make torch.compile recompile on the
    next step."""
    from rosafx.api import fuse_siblings
    from rosafx.training.compiled_step import CompiledStep, compile_options
    from rosafx.training.static_shapes import StaticShapes
    fuse_siblings(adapted)
    return CompiledStep(adapted, loss_fn, optimization, compile_options(compile, device),
                        max_grad_norm=max_grad_norm, autocast=autocast, static_shapes=StaticShapes(max_length=max_length))


def total_steps(train_batches, steps: int | None, epochs: float | None, grad_accum: int = 1) -> int:
    if (steps is None) == (epochs is None):
        raise RosafxError("Give fit exactly one of steps= (optimizer steps) or epochs=.")
    if steps is not None:                 # steps and epochs: checked by fit against their options
        return steps
    per_epoch = _steps_per_epoch(train_batches, grad_accum)
    if per_epoch is None:
        raise RosafxError("epochs= needs train_batches with a length; pass steps= instead.")
    return max(1, math.ceil(epochs * per_epoch))


def _steps_per_epoch(train_batches, grad_accum: int) -> int | None:
    try:
        return max(1, math.ceil(len(train_batches) / grad_accum))
    except TypeError:
        return None


class BatchStream:
    """Training batches across epochs, with the position a checkpoint needs to come back."""

    def __init__(self, batches: Iterable, epoch: int = 0, position: int = 0):
        self.batches, self.epoch, self.position = batches, epoch, position
        self._iterator: Iterator | None = None

    def _start_epoch(self) -> None:
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(self.epoch)
        iterator = iter(self.batches)
        if iterator is self.batches:
            raise RosafxError("train_batches is a one-shot iterator (a generator?); fit needs to iterate it once per "
                              "epoch: pass a list, a DataLoader or rosafx.recipes.data.Batches.")
        self._iterator = islice(iterator, self.position, None) if self.position else iterator

    def next(self):
        if self._iterator is None:
            self._start_epoch()
        batch = next(self._iterator, _END)
        if batch is _END:
            if self.position == 0:
                raise RosafxError("train_batches yielded no batch.")
            self.epoch, self.position = self.epoch + 1, 0
            self._start_epoch()
            batch = next(self._iterator, _END)
            if batch is _END:
                raise RosafxError("train_batches yielded no batch in a new epoch.")
        self.position += 1
        return batch

    def take(self, count: int, device) -> list:
        """The next ``count`` batches; ``taken_epoch`` is the epoch of the first."""
        first = to_device(self.next(), device)
        self.taken_epoch = self.epoch
        return [first] + [to_device(self.next(), device) for _ in range(count - 1)]


_END = object()


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _on_device(batches: Iterable, device) -> Iterator:
    return (to_device(b, device) for b in batches)


def train_step(model: nn.Module, batches: list, loss_fn: LossFn, optimization: Optimization,
               max_grad_norm: float | None = None, autocast=contextlib.nullcontext) -> float:
    """One optimizer step over ``batches`` (gradient accumulation); returns the mean loss."""
    total = 0.0
    for batch in batches:
        with autocast():
            loss = loss_fn(model, batch)
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            raise RosafxError("loss_fn(model, batch) must return a scalar tensor.")
        (loss / len(batches)).backward()
        total += loss.detach()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_grad_norm)
    optimization.optimizer.step()
    optimization.scheduler.step()
    optimization.optimizer.zero_grad(set_to_none=True)
    return float(total) / len(batches)


@torch.no_grad()
def evaluate(model: nn.Module, eval_batches: Iterable, loss_fn: LossFn | None = None,
             metrics: Metrics | None = None, *, progress: bool = True, device=None) -> dict:
    """``metrics(model, batches)`` in eval mode (default: ``{"eval_loss": mean loss_fn}``);
    keys come back prefixed ``eval_``. The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = device or next(iter(model.parameters())).device
    total = len(eval_batches) if hasattr(eval_batches, "__len__") else None
    batches = tqdm(_on_device(eval_batches, device), total=total, desc="rosafx evaluate", unit="batch",
                   leave=False, disable=not progress)
    try:
        if metrics is not None:
            result = metrics(model, batches)
        else:
            losses = [float(loss_fn(model, b)) for b in batches]
            if not losses:
                raise RosafxError("eval_batches yielded no batch.")
            result = {"loss": sum(losses) / len(losses)}
    finally:
        model.train(was_training)
    return {k if k.startswith("eval_") else f"eval_{k}": v for k, v in result.items()}


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "perplexity" in metric


def _evaluate_and_keep(model, eval_batches, loss_fn, metrics, loop, history, run, best_metric, progress, device):
    record = {"step": loop["step"], **evaluate(model, eval_batches, loss_fn, metrics, progress=progress,
                                               device=device)}
    history.evals.append(record)
    if run is not None:
        run.log(record)
        run.plot()
    if best_metric is None:
        return
    name = best_metric if best_metric.startswith("eval_") else f"eval_{best_metric}"
    if name not in record:
        raise RosafxError(f"best metric '{best_metric}' is not among the evaluation's {sorted(record)}.")
    best = loop["best"]
    better = best is None or (record[name] < best[name] if lower_is_better(name) else record[name] > best[name])
    if better:
        loop["best"] = record
        if run is not None:
            from rosafx.training.runs import BEST
            run.save_adapter(model, BEST)


def _resume(adapted, run: Run | None, optimization: Optimization, lifecycles: Lifecycles):
    if run is None:
        raise RosafxError("resume=True needs run= (the run directory to resume).")
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise RosafxError(f"{run.path} has no complete checkpoint to resume from; start the run without --resume.")
    tensors, state = Run.load_checkpoint(checkpoint)
    loop = restore_state(adapted, tensors, state, optimization, lifecycles)
    records = run.truncate_metrics(loop["step"])
    history = History([r for r in records if "loss" in r], [r for r in records if "loss" not in r])
    return loop, history


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _read(losses: list) -> list[float]:
    """Floats as they are; device tensors moved to the host together (one wait for the device)."""
    tensors = [loss for loss in losses if isinstance(loss, torch.Tensor)]
    if not tensors:
        return list(losses)
    read = iter(torch.stack([t.detach().to(torch.float64) for t in tensors]).cpu().tolist())
    return [next(read) if isinstance(loss, torch.Tensor) else loss for loss in losses]


def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise RosafxError(f"The training loss is {loss} at step {step}: lower the learning rate or check the data.")


__all__ = ["fit", "evaluate", "train_step", "History", "BatchStream", "total_steps", "to_device"]
