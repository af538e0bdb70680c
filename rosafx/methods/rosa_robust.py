"""rosa-robust: RoSA, robust adaptation (Nikdan et al., ICML 2024): low-rank + sparse.

    W_eff = W + s·B·A + S,   s = alpha/r,   S = CSR values on a fixed mask M

A, B start as LoRA's (A Kaiming, B = 0); S has no entries until ``rosafx.calibrate``
builds its mask. Until then a site trains as LoRA (the paper's warm-up). Calibration
accumulates a statistic of the full weight gradient G over the batches ("mean_squared":
the mean of G², a diagonal Fisher; "mean": the mean of G) and keeps exactly
⌊density·out·in⌋ entries by top-|·| over the whole matrix. Values start at 0, so the
function is unchanged. Indices are int64 buffers (no 32767 cap), values a Parameter in
CSR order. ΔW at merge = s·B·A + S.

Calibration replaces the ``sparse_values`` Parameter (its size changes): build the
optimizer after ``rosafx.calibrate``.

In ``rosafx.fit`` the life cycle follows the paper's schedule ("wl64"): LoRA alone for
``mask_warmup_steps`` optimizer steps, then one calibration pass builds the masks and the
optimizer is rebuilt (learning rate and schedule kept) so S trains from then on. With
``mask_warmup_steps = 0``, or a run no longer than the warm-up, or ``lowrank_init =
"lora-ga"`` (A = B = 0 cannot warm up), it calibrates before the first step. The
authors' restart from the pretrained weights with the saved masks is ``masks_of`` /
``apply_masks`` below, not part of fit.

``lowrank_init="lora-ga"`` (beyond the paper): A = B = 0 until calibrate, and the same pass
that builds the masks also gives A, B LoRA-GA's init from the mean gradient (``lora_ga.
gradient_init``, the paper's "ArB2r" + stable scale γ = ``ga_gamma`` on both factors);
the site then reads W − s·B0·A0 (saved with the adapter), so the function is unchanged.
s stays alpha/r. A site that already has a mask keeps it (restart flow: apply_masks, then
calibrate for the init only).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from rosafx.errors import RosafxError
from rosafx.methods.base import (Adapter, GraphEmitter, Lifecycle, Method, MethodConfig, TrainingContext,
                                 calibrate_pending, kaiming_uniform_)
from rosafx.methods.lora_ga import gradient_init

STATISTICS = ("mean_squared", "mean")
LOWRANK_INITS = ("lora", "lora-ga")


@dataclasses.dataclass
class RosaRobustConfig(MethodConfig):
    method = "rosa-robust"
    rank: int = 16
    alpha: float = 16.0
    density: float = 0.006
    statistic: str = "mean_squared"
    dropout: float = 0.0
    lowrank_init: str = "lora"   # "lora-ga": A, B from LoRA-GA's gradient SVD in the calibration pass
    ga_gamma: float = 16.0       # LoRA-GA's stable-scale γ (lowrank_init="lora-ga" only)
    mask_warmup_steps: int = 64  # fit: LoRA-only steps before the masks are built (paper: 64)

    def validate(self) -> None:
        super().validate()
        if self.lowrank_init not in LOWRANK_INITS:
            raise RosafxError(f"rosa-robust: lowrank_init must be one of {LOWRANK_INITS}, got {self.lowrank_init!r}.")
        if self.lowrank_init == "lora-ga" and self.rank == 0:
            raise RosafxError("rosa-robust: lowrank_init 'lora-ga' needs rank ≥ 1 (rank 0 has no low-rank part).")
        if self.ga_gamma <= 0:
            raise RosafxError(f"rosa-robust: ga_gamma must be positive, got {self.ga_gamma}.")
        if not 0.0 <= self.density <= 1.0:
            raise RosafxError(f"rosa-robust: density must be in [0, 1], got {self.density}.")
        if self.statistic not in STATISTICS:
            raise RosafxError(f"rosa-robust: statistic must be one of {STATISTICS}, got {self.statistic!r}.")
        if not isinstance(self.mask_warmup_steps, int) or self.mask_warmup_steps < 0:
            raise RosafxError(f"rosa-robust: mask_warmup_steps must be an integer ≥ 0, got {self.mask_warmup_steps!r}.")
        if self.rank == 0 and self.density == 0:
            raise RosafxError("rosa-robust: rank 0 and density 0 adapt nothing; raise one of them.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


def mask_from_statistic(stat: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of |stat| over the whole matrix -> (crow_indices, col_indices), CSR order."""
    out_features, in_features = stat.shape
    flat = torch.topk(stat.abs().flatten(), k, sorted=False).indices if k else torch.zeros(0, dtype=torch.long)
    flat = torch.sort(flat).values                               # row-major order = CSR order
    rows, cols = flat // in_features, flat % in_features
    crow = torch.zeros(out_features + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_features), 0)
    return crow, cols.to(torch.long)


class RosaRobustAdapter(Adapter):
    def __init__(self, site, config: RosaRobustConfig):
        super().__init__(site, config)
        self.scale = float(config.scale)
        self.budget = math.floor(config.density * site.out_features * site.in_features)
        self.gradient_init = config.lowrank_init == "lora-ga"
        A = torch.zeros(config.rank, site.in_features)
        self.lora_A = nn.Parameter(A if self.gradient_init else kaiming_uniform_(A))
        self.lora_B = nn.Parameter(torch.zeros(site.out_features, config.rank))
        if self.gradient_init:
            self.save_base_weight = True  # W − s·B0·A0 depends on the calibration data
            self.register_buffer("lowrank_initialised", torch.zeros((), dtype=torch.bool))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self._set_mask(torch.zeros(site.out_features + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long))

    def _set_mask(self, crow: Tensor, col: Tensor, values: Tensor | None = None) -> None:
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        device = self.lora_A.device                      # the adapter's own device (a GPU after capture there)
        self.sparse_values = nn.Parameter(torch.zeros(col.numel(), device=device) if values is None
                                          else values.float().to(device).clone())

    @property
    def masked(self) -> bool:
        return self.col_indices.numel() > 0 or self.budget == 0

    @property
    def calibrated(self) -> bool:
        return self.masked and (not self.gradient_init or bool(self.lowrank_initialised))

    def check_ready(self, action: str) -> None:
        if self.gradient_init and not bool(self.lowrank_initialised):
            raise RosafxError(f"rosa-robust site '{self.site_path}' uses lowrank_init 'lora-ga' and is not calibrated "
                              f"yet (A = B = 0), so it cannot {action}. Call rosafx.calibrate(adapted, batches, "
                              "loss_fn) first.")

    def emit(self, g: GraphEmitter, x, weight, bias):
        x_a = g.module("dropout", x) if self.dropout is not None else None
        return g.call(torch.ops.rosafx.sparse_lowrank_linear.default, x, weight, bias, g.attr("lora_A"),
                      g.attr("lora_B"), self.scale, g.attr("crow_indices"), g.attr("col_indices"),
                      g.attr("sparse_values"), x_a)

    def sparse_dense(self) -> Tensor:
        S = torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.sparse_values.detach().float(),
                                    (self.out_features, self.in_features))
        return S.to_dense()

    def delta_weight(self) -> Tensor:
        low_rank = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return low_rank + self.sparse_dense() if self.col_indices.numel() else low_rank

    # calibration: the mask
    def wants_gradient(self) -> bool:
        return not self.calibrated

    def begin_calibration(self) -> None:
        self._statistic = torch.zeros(self.out_features, self.in_features, dtype=torch.float64)
        self._grad_sum = torch.zeros(self.out_features, self.in_features) if self.gradient_init else None

    def observe_gradient(self, grad: Tensor) -> None:
        grad = grad.detach().to(self._statistic.device, torch.float64)
        self._statistic += grad.square() if self.config.statistic == "mean_squared" else grad
        if self._grad_sum is not None:
            self._grad_sum += grad.float()

    def end_calibration(self, num_batches: int, base_weight: Tensor):
        statistic, grad_sum = self._statistic / num_batches, self._grad_sum
        del self._statistic, self._grad_sum
        if not self.masked:
            crow, col = mask_from_statistic(statistic, self.budget)
            self.apply_mask(crow, col)
        if not self.gradient_init or bool(self.lowrank_initialised):
            return None
        A, B = gradient_init(grad_sum / num_batches, self.config.rank, self.config.ga_gamma, "paper")
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
            self.lowrank_initialised.fill_(True)
        offset = self.scale * (self.lora_B.float() @ self.lora_A.float()).to(base_weight.device)
        return (base_weight.float() - offset).to(base_weight.dtype)

    def apply_mask(self, crow: Tensor, col: Tensor) -> None:
        """Install a mask (e.g. one saved from a warm-up run) with zero values."""
        if crow.numel() != self.out_features + 1 or (col.numel() and int(col.max()) >= self.in_features):
            raise RosafxError(f"rosa-robust: a mask for {self.out_features} x {self.in_features} does not fit "
                              f"site '{self.site_path}'.")
        device = self.lora_A.device
        self._set_mask(crow.to(device, torch.long), col.to(device, torch.long))

    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        check_csr_mask(self.site_path, self.out_features, self.in_features, state["crow_indices"],
                       state["col_indices"], state["sparse_values"])
        self._set_mask(state["crow_indices"], state["col_indices"], state["sparse_values"])
        super().load_adapter_state(state)


class MaskSchedule(Lifecycle):
    """Warm-up as LoRA, then build the masks (see the module docstring)."""

    def _warmup(self, adapter: RosaRobustAdapter, ctx: TrainingContext) -> int:
        if adapter.gradient_init or (ctx.total_steps is not None and ctx.total_steps <= adapter.config.mask_warmup_steps):
            return 0
        return adapter.config.mask_warmup_steps

    def _calibrate_due(self, ctx: TrainingContext) -> None:
        due = [a for a in self.adapters if self._warmup(a, ctx) <= ctx.step]
        if calibrate_pending(due, ctx):
            ctx.rebuild_optimizer()  # sparse_values changed size: the optimizer must see the new Parameters

    def before_training(self, ctx: TrainingContext) -> None:
        self._calibrate_due(ctx)

    def after_step(self, ctx: TrainingContext) -> None:
        self._calibrate_due(ctx)


def check_csr_mask(path: str, rows: int, cols: int, crow: Tensor, col: Tensor, values: Tensor) -> None:
    """A saved mask comes from a file: a malformed CSR would index out of bounds in the
    sparse kernels, so its structure is checked before it is installed."""
    def bad(what: str) -> RosafxError:
        return RosafxError(f"rosa-robust: the saved sparse mask of '{path}' is malformed ({what}); the adapter file "
                           "is damaged or not from rosafx.")
    if crow.dim() != 1 or col.dim() != 1 or values.dim() != 1 or crow.dtype.is_floating_point \
            or col.dtype.is_floating_point:
        raise bad("crow_indices, col_indices and sparse_values must be 1-D, indices integer")
    if crow.numel() != rows + 1 or values.numel() != col.numel():
        raise bad(f"crow_indices has {crow.numel()} entries for {rows} rows, {col.numel()} columns for "
                  f"{values.numel()} values")
    if int(crow[0]) != 0 or int(crow[-1]) != col.numel() or bool((crow[1:] < crow[:-1]).any()):
        raise bad("crow_indices must rise from 0 to the number of values")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise bad(f"a column index lies outside 0..{cols - 1}")


class RosaRobust(Method):
    id = "rosa-robust"
    description = "RoSA, robust adaptation (Nikdan et al.): low-rank A, B plus sparse S on a gradient mask"
    Config = RosaRobustConfig
    Adapter = RosaRobustAdapter

    def lifecycle(self, adapters):
        return MaskSchedule(adapters)


def masks_of(adapted) -> dict[str, tuple[Tensor, Tensor]]:
    """Each rosa-robust site's mask (crow_indices, col_indices), for the restart flow."""
    from rosafx.graph.adapted_graph import adapters_of
    return {a.site_path: (a.crow_indices.clone(), a.col_indices.clone())
            for a in adapters_of(adapted).values() if isinstance(a, RosaRobustAdapter)}


def apply_masks(adapted, masks: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Install saved masks on a fresh adapted model (values 0): restart from pretrained weights."""
    from rosafx.graph.adapted_graph import adapters_of
    by_path = {a.site_path: a for a in adapters_of(adapted).values() if isinstance(a, RosaRobustAdapter)}
    missing = sorted(set(masks) - set(by_path))
    if missing:
        raise RosafxError(f"rosa-robust: no site for saved masks {missing}.")
    for path, (crow, col) in masks.items():
        by_path[path].apply_mask(crow, col)
