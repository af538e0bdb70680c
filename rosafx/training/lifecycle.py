"""The loop's side of the method life-cycle protocol (see ``rosafx/methods/base.py``):
find the methods present in a model, ask each for its ``Lifecycle``, dispatch events.

Any loop uses it the same way (``rosafx.fit``, a DDP script, a Trainer callback)::

    events = Lifecycles(adapted)
    events.before_training(ctx)
    for ...: optimizer.step(); ctx.step += 1; events.after_step(ctx)
"""
from __future__ import annotations

from torch import fx

from rosafx.graph.adapted_graph import adapters_of
from rosafx.methods import get_method
from rosafx.methods.base import Adapter, Lifecycle, TrainingContext


def lifecycles_of(model: fx.GraphModule) -> dict[str, Lifecycle]:
    """Method id -> its life cycle over its adapters in ``model`` (methods with none left out)."""
    by_method: dict[str, list[Adapter]] = {}
    for adapter in adapters_of(model).values():
        by_method.setdefault(adapter.config.method, []).append(adapter)
    found = {}
    for method_id in sorted(by_method):
        lifecycle = get_method(method_id).lifecycle(by_method[method_id])
        if lifecycle is not None:
            found[method_id] = lifecycle
    return found


class Lifecycles:
    """Every life cycle of one model, called in method-id order."""

    def __init__(self, model: fx.GraphModule):
        self.by_method = lifecycles_of(model)

    def before_training(self, ctx: TrainingContext) -> None:
        for lifecycle in self.by_method.values():
            lifecycle.before_training(ctx)

    def after_step(self, ctx: TrainingContext) -> None:
        for lifecycle in self.by_method.values():
            lifecycle.after_step(ctx)

    def state_dict(self) -> dict:
        return {method_id: lifecycle.state_dict() for method_id, lifecycle in self.by_method.items()}

    def load_state_dict(self, state: dict) -> None:
        for method_id, lifecycle in self.by_method.items():
            lifecycle.load_state_dict(state.get(method_id, {}))
