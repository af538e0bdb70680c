"""vera: Δ(x) = b ⊙ ((d ⊙ (dropout(x)·A_slᵀ))·B_slᵀ);  ΔW = diag(b)·B_sl·diag(d)·A_sl.

One frozen random pair A (r x in_max), B (out_max x r) serves every VeRA site of a model
(in_max / out_max = the largest over those sites); a site uses the leading slices
A[:, :in], B[:out, :]. Trainable per site: d (r, init d_initial) and b (out, init 0), so
the model is unchanged at init and a site trains out + r numbers.

The pair is drawn exactly as HF PEFT draws it for ``projection_prng_key = seed``: one CPU
generator, A first, then B, each uniform in ±√(6 / size(1)); so adapters move between
the two tools with identical outputs. It lives once at ``gm.rosafx_shared`` (buffers
``vera_A``, ``vera_B``) and is saved once.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, fx, nn

from rosafx.graph.adapted_graph import SHARED
from rosafx.graph.sites import Site
from rosafx.errors import RosafxError
from rosafx.ops import vera as vera_op
from rosafx.methods.base import Adapter, GraphEmitter, Method, MethodConfig


@dataclasses.dataclass
class VeraConfig(MethodConfig):
    method = "vera"
    rank: int = 256
    d_initial: float = 0.1
    seed: int = 0
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise RosafxError(f"vera: rank must be at least 1, got {self.rank}.")
        if not isinstance(self.seed, int):
            raise RosafxError(f"vera: seed must be an integer (HF PEFT's projection_prng_key), got {self.seed!r}.")


def draw_shared_pair(rank: int, in_max: int, out_max: int, seed: int) -> tuple[Tensor, Tensor]:
    """PEFT's ``_init_vera_A_vera_B``: A then B from one generator, kaiming-uniform (gain √2)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pair = []
    for shape in ((rank, in_max), (out_max, rank)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        pair.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))
    return pair[0], pair[1]


class VeraAdapter(Adapter):
    """d (r) and b (out); reads the shared pair through ``rosafx::vera_linear``."""

    bankable = ("lambda_d", "lambda_b")   # no life cycle: stacked with other sites' (passes/bank.py)

    def __init__(self, site, config: VeraConfig, shared: nn.Module):
        super().__init__(site, config)
        self.lambda_d = nn.Parameter(torch.full((config.rank,), float(config.d_initial)))
        self.lambda_b = nn.Parameter(torch.zeros(site.out_features))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        # a plain reference, not a submodule: the pair must be stored (and saved) once per model
        object.__setattr__(self, "_shared", shared)

    def emit(self, g: GraphEmitter, x, weight, bias):
        x_a = g.module("dropout", x) if self.dropout is not None else None
        return g.call(torch.ops.rosafx.vera_linear.default, x, weight, bias,
                      g.shared(f"{SHARED}.vera_A"), g.shared(f"{SHARED}.vera_B"),
                      g.attr("lambda_d"), g.attr("lambda_b"), x_a)

    def delta_weight(self) -> Tensor:
        A = self._shared.vera_A[:, : self.in_features].detach().float()
        B = self._shared.vera_B[: self.out_features, :].detach().float()
        d, b = self.lambda_d.detach().float(), self.lambda_b.detach().float()
        return (b[:, None] * B) @ (d[:, None] * A)


class Vera(Method):
    id = "vera"
    description = "VeRA (Kopiczko et al. 2024): shared frozen random A, B; trainable d, b; ΔW = diag(b)·B·diag(d)·A"
    peft_type = "VERA"

    def rank_limit(self, site: Site) -> int:
        # the shared random pair is often wider than the layer (the paper uses r = 1024 on 768-wide layers)
        return 4 * max(site.in_features, site.out_features)
    Config = VeraConfig
    Adapter = VeraAdapter

    def build(self, gm: fx.GraphModule, pairs) -> list[Adapter]:
        configs = [c for _, c in pairs]
        for field in ("rank", "seed"):
            values = sorted({getattr(c, field) for c in configs})
            if len(values) > 1:
                raise RosafxError(f"vera: all VeRA sites of a model share one random pair, so they must have one "
                                  f"'{field}'; the rules give {values}. Use one value for every VeRA rule.")
        if hasattr(gm, SHARED) and "vera_A" in getattr(gm, SHARED)._buffers:
            raise RosafxError("vera: this model already holds a VeRA pair; transform the original model instead.")
        in_max = max(s.in_features for s, _ in pairs)
        out_max = max(s.out_features for s, _ in pairs)
        A, B = draw_shared_pair(configs[0].rank, in_max, out_max, configs[0].seed)
        if not hasattr(gm, SHARED):
            gm.add_submodule(SHARED, nn.Module())
        shared = getattr(gm, SHARED)
        shared.register_buffer("vera_A", A)
        shared.register_buffer("vera_B", B)
        return [VeraAdapter(site, config, shared) for site, config in pairs]


assert vera_op  # the op must be registered before an adapter emits it
