"""lora-ga: LoRA initialised from the full-weight gradient (Wang et al., NeurIPS 2024).

Training is plain LoRA (``rosafx::lowrank_linear``). A and B are zero until
``rosafx.calibrate`` (``rosafx.fit`` calls it before the first step) hands each site the mean gradient G (out x in) of its weight; then

    U, S, V = svd_lowrank(G, q=min(4r, out, in), niter=4)
    A0 = Vᵀ[:r]            (top-r right singular vectors)
    B0 = U[:, r:2r]         (left singular vectors r+1..2r)          direction "ArB2r"
    "stable" scale: A0, B0 *= out^{1/4} / √γ  (γ = 16);  s = alpha / √r  (rsLoRA)
    W ← W − s·B0·A0         (fp32, cast back), so the output is unchanged

Convention "peft" follows HF PEFT's ``init_lora_weights="lora_ga"`` instead: B0 =
U[:, r:2r]·diag(S[r:2r]), the stable factor on B0 only, s = alpha / r unless rslora.

The graph reads the offset weight W0 − s·B0·A0 (buffer ``base_weight``), so merge gives
W0 + s·(B·A − B0·A0), exact relative to the original weights. The offset weight cannot be
rebuilt from the base model without the calibration data, so it is saved with the adapter
(``save_base_weight``); A0, B0 are kept (buffers) to state the delta against W0.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from rosafx.errors import RosafxError
from rosafx.methods.base import CalibrateFirst, Method
from rosafx.methods.lora import LoraConfig, LowRankAdapter

CONVENTIONS = ("paper", "peft")


@dataclasses.dataclass
class LoraGaConfig(LoraConfig):
    method = "lora-ga"
    convention: str = "paper"
    gamma: float = 16.0
    rslora: Optional[bool] = None  # None: the convention's own (paper: alpha/√r, peft: alpha/r)

    def validate(self) -> None:
        super().validate()
        if self.convention not in CONVENTIONS:
            raise RosafxError(f"lora-ga: convention must be one of {CONVENTIONS}, got {self.convention!r}.")
        if self.gamma <= 0:
            raise RosafxError(f"lora-ga: gamma must be positive, got {self.gamma}.")

    @property
    def scale(self) -> float:
        rslora = (self.convention == "paper") if self.rslora is None else self.rslora
        return self.alpha / (self.rank ** 0.5 if rslora else self.rank)


def gradient_init(grad: Tensor, rank: int, scale_gamma: float, convention: str) -> tuple[Tensor, Tensor]:
    """A0 (r x in) and B0 (out x r) from the mean gradient (fp32, out x in), before the offset."""
    out_f, in_f = grad.shape
    if 2 * rank > min(out_f, in_f):
        raise RosafxError(f"lora-ga: rank {rank} needs 2·rank ≤ min(out, in) = {min(out_f, in_f)} for the "
                          "ArB2r split of the gradient's singular vectors; use a smaller rank for this site.")
    U, S, V = torch.svd_lowrank(grad, q=min(4 * rank, min(grad.shape)), niter=4)
    A = V.t()[:rank, :]
    B = U[:, rank: 2 * rank]
    factor = (out_f ** 0.25) / (scale_gamma ** 0.5)
    if convention == "peft":
        B = B @ torch.diag(S[rank: 2 * rank]) * factor       # PEFT's order of operations, for equal numbers
    else:
        A, B = A * factor, B * factor
    return A.contiguous(), B.contiguous()


class LoraGaAdapter(LowRankAdapter):
    needs_calibration = True
    save_base_weight = True  # the offset W0 − s·B0·A0 depends on the calibration data

    def __init__(self, site, config: LoraGaConfig):
        super().__init__(site, config)
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.register_buffer("lora_A0", torch.zeros_like(self.lora_A))
        self.register_buffer("lora_B0", torch.zeros_like(self.lora_B))
        self._grad_sum: Tensor | None = None

    def check_ready(self, action: str) -> None:
        if not bool(self.calibrated):
            verb = {"train": "training", "merge": "merging"}.get(action, action)
            raise RosafxError(f"lora-ga site '{self.site_path}' is not calibrated yet, so {verb} it would be plain "
                              "LoRA from zero. Call rosafx.calibrate(adapted, batches, loss_fn) first.")

    # calibration: the mean gradient, accumulated on the CPU so that the device holds only
    # the one gradient autograd is producing (the reference code's memory trick)
    def wants_gradient(self) -> bool:
        return not bool(self.calibrated)

    def begin_calibration(self) -> None:
        self._grad_sum = None

    def observe_gradient(self, grad: Tensor) -> None:
        grad = grad.detach().float().cpu()
        self._grad_sum = grad.clone() if self._grad_sum is None else self._grad_sum.add_(grad)

    def end_calibration(self, num_batches: int, base_weight: Tensor) -> Tensor:
        if self._grad_sum is None:
            raise RosafxError(f"lora-ga site '{self.site_path}' got no gradient during calibration: the loss does "
                              "not depend on it.")
        grad = (self._grad_sum / num_batches).to(self.lora_A.device)
        self._grad_sum = None
        A, B = gradient_init(grad, self.config.rank, self.config.gamma, self.config.convention)
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
            self.lora_A0.copy_(A)
            self.lora_B0.copy_(B)
            self.calibrated.fill_(True)
        offset = self.scale * (B.float() @ A.float())
        return (base_weight.float().to(offset.device) - offset).to(base_weight.dtype)

    def delta_from_original(self) -> Tensor:
        """ΔW relative to the user's original weight: s·(B·A − B0·A0), fp32."""
        return self.delta_weight() - self.scale * (self.lora_B0.float() @ self.lora_A0.float())


class LoraGa(Method):
    id = "lora-ga"
    description = "LoRA-GA (Wang et al. 2024): LoRA with A, B from the SVD of the full gradient (rosafx.calibrate)"
    Config = LoraGaConfig
    Adapter = LoraGaAdapter

    def lifecycle(self, adapters):
        return CalibrateFirst(adapters)  # A, B come from the gradient before step 1
