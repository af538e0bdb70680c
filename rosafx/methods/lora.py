"""lora: Δ(x) = s·(dropout(x)·Aᵀ)·Bᵀ, s = alpha/r (alpha/√r with rslora).

Init: A Kaiming-uniform (as nn.Linear), B = 0, so the model is unchanged at init.
ΔW = s·B·A.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from rosafx.errors import RosafxError
from rosafx.ops import lowrank
from rosafx.methods.base import Adapter, GraphEmitter, Method, MethodConfig, kaiming_uniform_


@dataclasses.dataclass
class LoraConfig(MethodConfig):
    method = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise RosafxError(f"{self.method}: rank must be at least 1, got {self.rank}.")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LowRankAdapter(Adapter):
    """A (r x in) and B (out x r) applied through ``rosafx::lowrank_linear``."""

    def __init__(self, site, config):
        super().__init__(site, config)
        self.scale = float(config.scale)
        self.lora_A = nn.Parameter(torch.zeros(config.rank, site.in_features))
        self.lora_B = nn.Parameter(torch.zeros(site.out_features, config.rank))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def emit(self, g: GraphEmitter, x, weight, bias):
        x_a = g.module("dropout", x) if self.dropout is not None else None
        return g.call(torch.ops.rosafx.lowrank_linear.default, x, weight, bias,
                      g.attr("lora_A"), g.attr("lora_B"), self.scale, x_a)

    def delta_weight(self) -> Tensor:
        return self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def emit_delta(self, g: GraphEmitter):
        """ΔW = s·B·A in the graph (expert sites). Dropout acts on x, which a weight-space
        adapter never sees, so it is refused (as HF PEFT does for target_parameters)."""
        if self.dropout is not None:
            raise RosafxError(f"Site '{self.site_path}' is an expert weight: its adapter acts on the weight, "
                              "so dropout cannot apply; use dropout 0 for it.")
        product = g.call(torch.ops.aten.mm.default, g.attr("lora_B"), g.attr("lora_A"))
        return g.call(torch.ops.aten.mul.Tensor, product, self.scale)


class LoraAdapter(LowRankAdapter):
    bankable = ("lora_A", "lora_B")  # no life cycle: rosa, lora-ga (LowRankAdapter too) have one

    def __init__(self, site, config):
        super().__init__(site, config)
        kaiming_uniform_(self.lora_A)


class Lora(Method):
    id = "lora"
    description = "LoRA (Hu et al. 2021): trainable low-rank A, B; ΔW = alpha/r·B·A"
    peft_type = "LORA"
    Config = LoraConfig
    Adapter = LoraAdapter
    adapts_expert_weights = True
    adapts_partly_captured = True


assert lowrank  # the op must be registered before an adapter emits it
