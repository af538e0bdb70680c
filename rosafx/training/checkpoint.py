"""What a checkpoint holds beyond the adapter tensors, and putting it back: optimizer and
schedule, RNG states, the data position, the methods' life-cycle state, the loop's
counters. Restored in the same order, a resumed run repeats the uninterrupted one."""
from __future__ import annotations

import random

import torch
from torch import fx

from rosafx.training.lifecycle import Lifecycles
from rosafx.training.optim import Optimization


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def capture_state(loop: dict, optimization: Optimization, lifecycles: Lifecycles) -> dict:
    return {"loop": dict(loop), "optimization": optimization.state_dict(), "rng": rng_state(),
            "lifecycles": lifecycles.state_dict()}


def restore_state(model: fx.GraphModule, tensors: dict, state: dict, optimization: Optimization,
                  lifecycles: Lifecycles) -> dict:
    """Install the adapter tensors, build the optimizer over the Parameters they define
    (rosa-robust's masks change them), then load the rest. Returns the loop counters."""
    from rosafx.pipeline.serialize import install_tensors
    install_tensors(model, tensors)
    optimization.build(model)
    optimization.load_state_dict(state["optimization"])
    lifecycles.load_state_dict(state["lifecycles"])
    set_rng_state(state["rng"])
    return dict(state["loop"])
