"""Calibrate: the data-dependent preparation of every site that asks for it.

Part of the core, not a graph pass: methods' life cycles call it (rosafx/methods/base.py,
``calibrate_pending``), and the only graph change it makes goes through the adapted-graph
owner (``set_base_weight``).

One pass over the user's batches serves every such site (lora-ga's init and rosa-robust's
masks alike). For each site whose adapter ``wants_gradient()``, the weight the site reads
is made to require grad for the duration; a post-accumulate hook hands each batch's
gradient (out x in, fp32) to ``adapter.observe_gradient`` and frees it at once, so at
most one full weight gradient is alive beyond the model's own memory. Every other
parameter is frozen meanwhile. Afterwards ``adapter.end_calibration`` may return a new
frozen base weight for its site (lora-ga's offset), which the graph then reads. On a
quantized base the gradient is taken through the dequantized weight (QRoSA): it is held as
one leaf tensor while calibration runs (``holding_dequantized``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import fx
from tqdm.auto import tqdm

from rosafx.graph.adapted_graph import (adapter_nodes, adapters_of, holding_dequantized, set_base_weight, site_of,
                                        site_weight)
from rosafx.errors import RosafxError
from rosafx.methods.collectives import broadcast_adapters, mean_across_ranks


def site_weight_leaves(gm: fx.GraphModule) -> dict[str, tuple[torch.Tensor, bool]]:
    """Site path -> (the leaf tensor its op nodes read as W, whether it is stored in x out)."""
    return {path: site_weight(gm, path) for path in dict.fromkeys(site_of(n) for n in adapter_nodes(gm))}


@contextmanager
def _only_these_require_grad(gm: fx.GraphModule, leaves: list[torch.Tensor]):
    saved = [(p, p.requires_grad) for p in gm.parameters()]
    saved += [(t, t.requires_grad) for t in leaves]
    try:
        for p in gm.parameters():
            p.requires_grad_(False)
        for t in leaves:
            t.requires_grad_(True)
        gm._rosafx_calibrating = True
        yield
    finally:
        gm._rosafx_calibrating = False
        for t, flag in saved:
            t.requires_grad_(flag)
            t.grad = None


def calibrate(adapted: fx.GraphModule, batches: Iterable, loss_fn: Callable, *,
              progress: bool = True, only: Iterable | None = None) -> fx.GraphModule:
    """Average what each calibrating site needs over ``batches``; ``loss_fn(model, batch)``
    returns a scalar loss. Returns the same module, ready to train. ``only``: calibrate
    just these adapters (a method's life cycle calibrates its own sites)."""
    chosen = None if only is None else {id(a) for a in only}
    adapters = {k: a for k, a in adapters_of(adapted).items()
                if a.wants_gradient() and (chosen is None or id(a) in chosen)}
    if not adapters:
        raise RosafxError("No site of this model needs calibration (only lora-ga and rosa-robust do).")
    with holding_dequantized(adapted, list(adapters)):
        return _calibrate(adapted, adapters, batches, loss_fn, progress)


def _calibrate(adapted, adapters: dict, batches, loss_fn, progress: bool) -> fx.GraphModule:
    leaves = site_weight_leaves(adapted)
    shared = [k for k in adapters if sum(leaves[k][0] is leaves[j][0] for j in leaves) > 1]
    if shared:
        raise RosafxError(f"Sites {shared} read the same weight tensor; calibrate them separately.")
    hooks = []

    def observer(path: str, stored_in_out: bool):
        def hook(tensor: torch.Tensor) -> None:
            grad = mean_across_ranks(tensor.grad.detach())  # under DDP: every rank's data
            adapters[path].observe_gradient((grad.t() if stored_in_out else grad).float())
            tensor.grad = None  # free it now: one full gradient at a time
        return hook

    for adapter in adapters.values():
        adapter.begin_calibration()
    num_batches = 0
    with _only_these_require_grad(adapted, [leaves[k][0] for k in adapters]):
        for path in adapters:
            tensor, stored_in_out = leaves[path]
            hooks.append(tensor.register_post_accumulate_grad_hook(observer(path, stored_in_out)))
        try:
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in tqdm(batches, total=total, desc="rosafx calibrate", disable=not progress, unit="batch"):
                loss = loss_fn(adapted, batch)
                if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                    raise RosafxError("loss_fn(model, batch) must return a scalar tensor.")
                loss.backward()
                num_batches += 1
        finally:
            for handle in hooks:
                handle.remove()
    if num_batches == 0:
        raise RosafxError("calibrate got no batches: pass a non-empty iterable.")
    for path, adapter in adapters.items():
        tensor, stored_in_out = leaves[path]
        base = (tensor.t() if stored_in_out else tensor).detach()
        new_base = adapter.end_calibration(num_batches, base)
        if new_base is not None:
            set_base_weight(adapted, path, new_base.to(base.dtype))
    broadcast_adapters(adapters.values())  # under DDP: rank 0's result, bit for bit, on every rank
    return adapted
