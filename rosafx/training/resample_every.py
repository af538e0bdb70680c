"""Small training helpers that work with any loop."""
from __future__ import annotations

import torch
from torch import fx

from rosafx.errors import RosafxError


class ResampleEvery:
    """Call ``.step(adapted, optimizer)`` after each optimizer step; every ``n`` steps it runs
    ``rosafx.resample`` (rosa), which keeps the function and resets the factors' optimizer
    state."""

    def __init__(self, n: int):
        if not isinstance(n, int) or n < 1:
            raise RosafxError(f"ResampleEvery(n) needs n >= 1 optimizer steps between resamples, got {n!r}.")
        self.n, self.steps = n, 0

    def step(self, adapted: fx.GraphModule, optimizer: torch.optim.Optimizer | None = None) -> bool:
        from rosafx.passes.resample import resample
        self.steps += 1
        if self.steps % self.n:
            return False
        resample(adapted, optimizer)
        return True
