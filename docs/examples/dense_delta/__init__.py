"""dense-delta: the example method of docs/adding_a_method.md.

Δ(x) = scale·x·Dᵀ with one trainable dense D (out x in, init 0), so ΔW = scale·D. It is
full fine-tuning kept apart from the frozen weight: nothing a real project needs (use
``full`` or lora), but every piece a method has, in one small file: a config, an op with
its gradients, an adapter module, its PEFT mapping and the registry entry. Its Triton
implementation is the folder's other file, triton_kernel.py; registering the method is one
line in rosafx/methods/__init__.py, and nothing else in rosafx changes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rosafx.errors import RosafxError
from rosafx.methods.base import Adapter, GraphEmitter, Method, MethodConfig
from rosafx.ops.spec import op_spec, rows


# --- 1. the config: options, defaults, validation ------------------------------------------

@dataclasses.dataclass
class DenseDeltaConfig(MethodConfig):
    method = "dense-delta"
    scale: float = 1.0

    def validate(self) -> None:
        super().validate()                   # finite floats, ranks, dropout: shared checks
        if self.scale == 0:
            raise RosafxError("dense-delta: scale must be non-zero (ΔW = scale·D).")


# --- 2. the op: declared once (schema, fake, gradients), then its torch implementation ----

@op_spec(roles={"input": "x", "weight": "weight", "bias": "bias", "scale": "scale"},
         kernels=f"{__name__}.triton_kernel")
def dense_delta_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], D: Tensor, scale: float) -> Tensor:
    """y = x·(W + scale·D)ᵀ + b.

    Gradients, every leading dim flattened to N rows:

        dx = dy·(W + scale·D)
        dD = scale·dyᵀ·x                 (out x in)
        dW = dyᵀ·x,  db = Σ dy           (only when asked: calibration hooks on W)
    """


def merged_weight(weight, D, scale):
    """W + scale·D; the Triton implementation (triton_kernel.py) passes its own as ``merged``."""
    return weight + scale * D.to(weight.dtype)


def forward(x, weight, bias, D, scale, merged=merged_weight):
    return F.linear(x, merged(weight, D, scale), bias)


def backward(dy, needs, x, weight, bias, D, scale, merged=merged_weight):
    dy2, x2 = rows(dy), rows(x)
    dx = dW = db = dD = None
    if needs[0]:
        dx = (dy2 @ merged(weight, D, scale)).reshape(x.shape)
    if needs[1] or needs[3]:
        dyT_x = dy2.t() @ x2
        dW = dyT_x if needs[1] else None
        dD = (scale * dyT_x).to(D.dtype) if needs[3] else None
    if needs[2] and bias is not None:
        db = dy2.sum(0)
    return dx, dW, db, dD, None


dense_delta_linear.implement("torch", forward, backward)


# --- 3. the adapter: one per site; owns its tensors, writes its node, gives ΔW ---------------

class DenseDeltaAdapter(Adapter):
    def __init__(self, site, config: DenseDeltaConfig):
        super().__init__(site, config)
        self.scale = float(config.scale)
        self.delta = nn.Parameter(torch.zeros(site.out_features, site.in_features))

    def emit(self, g: GraphEmitter, x, weight, bias):
        return g.call(torch.ops.rosafx.dense_delta_linear.default, x, weight, bias, g.attr("delta"), self.scale)

    def delta_weight(self) -> Tensor:
        return self.scale * self.delta.detach().float()


# --- 4. the registry entry and the PEFT mapping ----------------------------------------------

class DenseDelta(Method):
    id = "dense-delta"
    description = "example: one trainable dense ΔW per site (docs/adding_a_method.md)"
    Config = DenseDeltaConfig
    Adapter = DenseDeltaAdapter
    # HF PEFT has no adapter type that holds a dense ΔW, so there is no PEFT mapping:
    # save(format="peft") refuses this method and says to save with format="rosafx".
    peft_type = None
