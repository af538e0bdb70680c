"""rosa: ROSA, random subspace adaptation (Hameed et al., arXiv 2407.07802).

Each target weight is factorised by SVD, W = U·Σ·Vᵀ. A contiguous block ``idx`` of
``rank`` singular indices is picked (start uniform in [0, n − rank] for ``random``; the
first block for ``top``, the last for ``bottom``). The trainable factors are those real
singular components, in LoRA's shapes:

    B = (U·Σ)[:, idx]  (out x rank),   A = Vᵀ[idx, :]  (rank x in)
    base_weight = W − B·A  (frozen),   so base_weight + B·A = W and the output is unchanged

``rosafx.resample`` folds B·A back into the frozen weight and factorises again with a
fresh block. ΔW at merge = B·A relative to base_weight: merge is exact.

In ``rosafx.fit`` the life cycle resamples every ``resample_every`` optimizer steps (None:
once per epoch, the paper's schedule, when the loop knows the epoch length; 0: never)
and clears the factors' optimizer state, as the reference code's new optimizer does.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from rosafx.errors import RosafxError
from rosafx.methods.collectives import broadcast_adapters
from rosafx.methods.base import Lifecycle, Method, MethodConfig, TrainingContext
from rosafx.methods.lora import LowRankAdapter

SELECTIONS = ("random", "top", "bottom")


@dataclasses.dataclass
class RosaConfig(MethodConfig):
    method = "rosa"
    rank: int = 8
    seed: int = 0
    selection: str = "random"
    dropout: float = 0.0
    resample_every: int | None = None  # optimizer steps between resamples in fit; None: each epoch; 0: never

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise RosafxError(f"rosa: rank must be at least 1, got {self.rank}.")
        if self.selection not in SELECTIONS:
            raise RosafxError(f"rosa: selection must be one of {SELECTIONS}, got {self.selection!r}.")
        if self.resample_every is not None and (not isinstance(self.resample_every, int) or self.resample_every < 0):
            raise RosafxError(f"rosa: resample_every must be a number of steps ≥ 0 (0: never) or null (each "
                              f"epoch), got {self.resample_every!r}.")

    @property
    def scale(self) -> float:
        return 1.0  # the factors are the singular components themselves


class RosaAdapter(LowRankAdapter):
    save_base_weight = True  # the frozen remainder moves with every resample

    def __init__(self, site, config: RosaConfig, site_index: int):
        super().__init__(site, config)
        if config.rank > min(site.in_features, site.out_features):
            raise RosafxError(f"rosa: rank {config.rank} exceeds min(out, in) = "
                              f"{min(site.in_features, site.out_features)} at site '{site.path}'.")
        self.site_index = site_index
        self.register_buffer("resamples", torch.zeros((), dtype=torch.long))
        self.register_buffer("base_weight", torch.zeros(site.out_features, site.in_features, dtype=site.dtype))

    def block_start(self) -> int:
        """The first singular index of this site's block for the current resample round."""
        n, rank = min(self.in_features, self.out_features), self.config.rank
        if self.config.selection == "top":
            return 0
        if self.config.selection == "bottom":
            return n - rank
        generator = torch.Generator().manual_seed(
            (self.config.seed * 1_000_003 + self.site_index) * 1_000_033 + int(self.resamples))
        return int(torch.randint(0, n - rank + 1, (), generator=generator))

    def delta_weight(self) -> Tensor:
        return self.lora_B.detach().float() @ self.lora_A.detach().float()


def split_weights(adapters: list[RosaAdapter], weights: list[Tensor]) -> None:
    """Factorise each weight (out x in), install its block as (B, A) and the remainder as
    base_weight. Weights of the same shape share one batched SVD call."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, w in enumerate(weights):
        by_shape.setdefault(tuple(w.shape), []).append(i)
    with torch.no_grad():
        for indices in by_shape.values():
            stack = torch.stack([weights[i].detach().float() for i in indices])
            if stack.shape[-2] < stack.shape[-1]:
                # LAPACK is about 2x faster on tall matrices: Wᵀ = V·Σ·Uᵀ, so swap the factors back
                V, S, Uh = torch.linalg.svd(stack.mT, full_matrices=False)
                U, Vh = Uh.mT, V.mT
            else:
                U, S, Vh = torch.linalg.svd(stack, full_matrices=False)
            for j, i in enumerate(indices):
                adapter, rank = adapters[i], adapters[i].config.rank
                start = adapter.block_start()
                B = U[j][:, start:start + rank] * S[j][start:start + rank]
                A = Vh[j][start:start + rank, :]
                adapter.lora_B.copy_(B)
                adapter.lora_A.copy_(A)
                remainder = weights[i].detach().double() - B.double() @ A.double()
                adapter.base_weight.copy_(remainder.to(adapter.base_weight.dtype))


def resample_adapters(adapters: list[RosaAdapter], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Resample these rosa sites (all of a model's, or one group of its life cycle)."""
    with torch.no_grad():
        folded = [a.base_weight.double() + a.lora_B.double() @ a.lora_A.double() for a in adapters]
        for adapter in adapters:
            adapter.resamples += 1
        split_weights(adapters, folded)
    broadcast_adapters(adapters)  # under DDP: rank 0's factorisation on every rank, bit for bit
    if optimizer is not None:
        for adapter in adapters:
            for param in (adapter.lora_A, adapter.lora_B):
                optimizer.state.pop(param, None)


class ResampleSchedule(Lifecycle):
    """Resample each group of sites (same ``resample_every``) when its interval comes round."""

    def after_step(self, ctx: TrainingContext) -> None:
        groups: dict[int, list[RosaAdapter]] = {}
        for adapter in self.adapters:
            every = adapter.config.resample_every
            every = (ctx.steps_per_epoch or 0) if every is None else every
            if every and ctx.step % every == 0:
                groups.setdefault(every, []).append(adapter)
        for group in groups.values():
            resample_adapters(group, ctx.optimizer)


class Rosa(Method):
    id = "rosa"
    description = "ROSA, random subspace adaptation (Hameed et al.): train a random block of W's singular components"
    Config = RosaConfig
    Adapter = RosaAdapter
    actions = {"resample": resample_adapters}

    def build(self, gm, pairs):
        adapters, weights = [], []
        for index, (site, config) in enumerate(pairs):
            adapters.append(RosaAdapter(site, config, index))
            weight = gm.get_parameter(site.weight_name)
            weights.append(weight.t() if site.stored_in_out else weight)
        split_weights(adapters, weights)
        return adapters

    def lifecycle(self, adapters):
        return ResampleSchedule(adapters)
