"""Optimizer and learning-rate schedule for ``rosafx.fit``, and their rebuild when a
method's life cycle replaces a Parameter (the schedule and other parameters' state kept)."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from rosafx.training.bank_state import from_canonical, to_canonical
from rosafx.errors import RosafxError

SCHEDULES = ("linear", "cosine", "constant")
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adamw(lr: float, weight_decay: float = 0.0, *, static: torch.device | None = None) -> OptimizerFactory:
    """AdamW(lr, weight_decay). ``static`` (the training device) builds it for a captured step
    (rosafx/training/compiled_step.py): the rate a 0-dim float64 tensor on the host that the
    schedule fills in place, so a compiled step sees new data, not a new constant to recompile
    for (float64: the same rates as the eager schedule's Python floats); on CUDA also
    ``capturable=True`` (step count and bias corrections stay on the device, no host read) with
    the foreach kernels. Off CUDA capturable is refused by torch and foreach does not take a
    tensor rate, so there it is the single-tensor AdamW."""
    if static is None:
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    on_cuda = torch.device(static).type == "cuda"
    return lambda params: torch.optim.AdamW(params, lr=torch.tensor(lr, dtype=torch.float64),
                                            weight_decay=weight_decay, capturable=on_cuda, foreach=on_cuda)


def lr_factor(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR after ``step`` optimizer steps: linear warm-up, then the schedule."""
    if schedule not in SCHEDULES:
        raise RosafxError(f"Unknown schedule '{schedule}': use one of {SCHEDULES}.")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(progress, 1.0)
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


@dataclasses.dataclass
class Optimization:
    """The optimizer, its schedule, and how to build them again."""
    factory: OptimizerFactory
    schedule: Callable[[int], float]
    optimizer: torch.optim.Optimizer = None
    scheduler: torch.optim.lr_scheduler.LambdaLR = None
    model: nn.Module = None          # what the optimizer was built over (its banking decides the state's form)

    def build(self, model: nn.Module) -> "Optimization":
        self.model = model
        params = trainable_parameters(model)
        if not params:
            raise RosafxError("The model has no trainable parameters: transform it with at least one adapter rule.")
        self.optimizer = self.factory(params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        return self

    def rebuild(self, model: nn.Module) -> None:
        """New optimizer over the current Parameters; state of those that survived and the
        schedule position carry over."""
        old_optimizer, old_scheduler = self.optimizer, self.scheduler.state_dict()
        lrs = [group["lr"] for group in old_optimizer.param_groups]
        self.build(model)
        for param in trainable_parameters(model):
            if param in old_optimizer.state:
                self.optimizer.state[param] = old_optimizer.state[param]
        self.scheduler.load_state_dict(old_scheduler)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    def state_dict(self) -> dict:
        """Rates as Python floats, so a checkpoint of a compiled run (tensor rates) resumes
        eagerly and the other way round."""
        optimizer = to_canonical(self.model, self.optimizer, self.optimizer.state_dict())
        scheduler = self.scheduler.state_dict()
        optimizer["param_groups"] = [{k: _number(v) if k in RATES else v for k, v in group.items()}
                                     for group in optimizer["param_groups"]]
        scheduler = {k: ([_number(v) for v in value] if k in ("base_lrs", "_last_lr") else value)
                     for k, value in scheduler.items()}
        return {"optimizer": optimizer, "scheduler": scheduler}

    def load_state_dict(self, state: dict) -> None:
        """Loads ``state``; rates this optimizer holds as tensors stay those tensors (filled)."""
        tensors = [{k: v for k, v in group.items() if k in RATES and isinstance(v, torch.Tensor)}
                   for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(from_canonical(self.model, self.optimizer, state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        for group, kept in zip(self.optimizer.param_groups, tensors):
            for key, tensor in kept.items():
                tensor.fill_(_number(group[key]))
                group[key] = tensor

    def lr(self) -> float:
        return _number(self.optimizer.param_groups[0]["lr"])


RATES = ("lr", "initial_lr")


def _number(value) -> float:
    return float(value) if isinstance(value, torch.Tensor) else value
