"""Optimizer and learning-rate schedule for ``rosafx.fit``, and their rebuild when a
method's life cycle replaces a Parameter (the schedule and other parameters' state kept)."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from rosafx.errors import RosafxError

SCHEDULES = ("linear", "cosine", "constant")
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adamw(lr: float, weight_decay: float = 0.0) -> OptimizerFactory:
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


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

    def build(self, model: nn.Module) -> "Optimization":
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
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]
