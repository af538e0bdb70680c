"""``rosafx.transform``: the pipeline, top to bottom.

    transform = capture -> sites -> plan (from rules) -> apply
    load      = capture -> sites -> plan (from the saved record) -> apply -> install tensors

``capture_sites`` is the first two steps (one capture; a model that does not export as a
whole is captured in parts, rosafx/pipeline/partial.py), ``apply`` the last: adapters inserted on the
plan's sites, ``full`` modules made trainable, the adapted graph's record written
(rosafx/graph/adapted_graph.py).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import fx, nn

from rosafx.passes.bank import bank_adapters
from rosafx.passes.drop_export_asserts import drop_export_asserts
from rosafx.passes.dropout import dropout_follows_mode
from rosafx.passes.insert import insert_planned
from rosafx.passes.quantize import quantizable_weights, round_base_weights, store_packed

from rosafx.graph.adapted_graph import META, SHARED, adapters_of, fetch_attr, fingerprint, make_record
from rosafx.ops.quantized import Quantization
from rosafx.graph.capture import capture
from rosafx.errors import RosafxError
from rosafx.pipeline.partial import apply_to_parts, capture_parts
from rosafx.graph.plan import Plan
from rosafx.graph.sites import Captured, find_sites, module_types


def capture_sites(model: nn.Module, example_inputs: Any = None) -> Captured:
    """capture -> export's metadata asserts dropped -> dropout follows train()/eval() -> sites.
    A model that torch.export cannot trace as a whole is captured in parts
    (``rosafx.pipeline.partial``)."""
    try:
        gm, args, kwargs = capture(model, example_inputs)
    except RosafxError as exc:
        if exc.__cause__ is None or not isinstance(model, nn.Module):
            raise  # bad inputs, not a model that does not trace
        return capture_parts(model, example_inputs, reason=str(exc).splitlines()[0])
    gm = drop_export_asserts(gm)                        # run-time re-checks of capture-time metadata
    gm = dropout_follows_mode(gm)                       # aten.dropout -> nn.Dropout (honours train())
    return Captured(gm, find_sites(gm), module_types(gm), (args, kwargs))


def transform(model: nn.Module, rules: dict, *, example_inputs: Any = None, quantize=None,
              bank: bool = True) -> fx.GraphModule:
    """Capture ``model`` as an FX graph and insert adapters on the sites that ``rules`` select.

    ``rules`` maps a key to a config (``{"method": "lora", "rank": 8, "alpha": 16}``, a method
    config object, ``{"method": "full"}`` to train a whole module as is, or ``None`` to
    exclude). Keys, weakest to strongest; the strongest match wins, and among keys of one
    kind the first listed wins (rosafx/graph/rules.py):

      1. a module class (``nn.Linear``) or ``"type:Conv1D"``;
      2. a regular expression that fully matches the path (``"re:..."``, or any text with
         a regex character such as ``*`` or ``(``);
      3. a dot-suffix of the path (plain text: ``"query"``; the whole path outranks a part);
      4. an exact path (``"path:encoder.layer.0.attention.self.query"``).

    The user's model is never changed. The result is called like the model and only
    adapter (and ``full``) parameters require grad. A model that torch.export cannot trace
    as a whole is captured in parts (``rosafx.pipeline.partial``), with a warning.

    ``quantize``: ``"nf4"``, ``"int4"``, ``"int8"`` or ``{"scheme": ..., "group_size": N}``
    (default group 64): every linear weight outside the ``full`` modules is stored quantized
    and dequantized inside its product; adapters train on top (QLoRA). See
    rosafx/ops/quantized.py and passes/quantize.py.

    ``bank`` (default on): lora's many small A and B tensors train as a few stacked
    Parameters (``rosafx_bank.lora_A_0`` ...), so an optimizer's per-tensor loop runs over a
    handful of tensors instead of two per site (passes/bank.py). The graph, merge, save and
    export are unchanged; a site's gradient is ``rosafx.passes.bank.site_grad``.
    ``bank=False`` (or ``rosafx.unbank`` later) gives each tensor its own Parameter, as
    export of a training forward and FSDP need (torch.compile works either way).
    """
    quantization = Quantization.parse(quantize)  # a bad scheme fails before the capture
    captured = capture_sites(model, example_inputs)
    plan = Plan.from_rules(rules, captured.sites, captured.modules)
    return apply(captured, plan, quantization, bank=bank)


def apply(captured: Captured, plan: Plan, quantize: Quantization | None = None, *, bank: bool = True) -> nn.Module:
    """Insert the plan's adapters into the captured graph (or parts) and record the plan;
    with ``quantize``, the frozen linear weights are stored packed (passes/quantize.py);
    with ``bank``, lora's tensors are stacked for the optimizer (passes/bank.py)."""
    if captured.partial_reason is not None and quantize is not None:
        raise RosafxError(f"A quantized base needs the whole model in one graph; this one is captured in parts "
                          f"({captured.partial_reason}). Train it without quantize.")
    if captured.partial_reason is not None:
        adapted = apply_to_parts(captured, plan)
        warnings.warn(f"rosafx: {captured.partial_reason} -- captured the submodules that export instead "
                      "(see docs/architectures.md; `rosafx inspect` lists the parts).", stacklevel=3)
        return adapted
    gm, sites = captured.module, captured.sites
    plan.check(sites, captured.modules)
    weights = {s.path: (s.weight_name, s.stored_in_out) for s in sites if s.path in plan.sites}
    base_print = fingerprint(gm, [w for w, _ in weights.values()])  # the user's weights, before any rounding
    packed = {}
    if quantize is not None:                            # W -> dequant(quant(W)) in the capture
        packed = round_base_weights(gm, quantizable_weights(gm, sites, plan.full), quantize)
    gm = insert_planned(gm, sites, plan.sites)                  # sites -> rosafx op nodes
    _follow_site_devices(gm, [s for s in sites if s.path in plan.sites])
    _make_trainable(gm, plan.full)                      # full modules: own copy, requires_grad
    gm = store_packed(gm, packed)                       # W's reads -> its packed module; fp32 W dropped
    extra = {"quantize": quantize} if quantize is not None else {}
    gm.meta[META] = make_record(plan, weights, captured.example_inputs, base_print, **extra)
    _install_ready_check(gm)
    if bank:
        gm = bank_adapters(gm)
    return gm


def _follow_site_devices(gm: fx.GraphModule, sites: list) -> None:
    """Adapters are built on the CPU; a model captured on a GPU trains them where its weights
    are (dtypes stay: adapter tensors keep their own precision)."""
    adapters = adapters_of(gm)
    devices = set()
    for site in sites:
        device = fetch_attr(gm, site.weight_name).device
        devices.add(device)
        if site.path in adapters:
            adapters[site.path].to(device)
    shared = getattr(gm, SHARED, None)
    if shared is not None and len(devices) == 1:
        shared.to(devices.pop())


def _make_trainable(gm: fx.GraphModule, full_paths: list[str]) -> None:
    for path in full_paths:
        module = gm.get_submodule(path)
        for name, param in list(module.named_parameters()):
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            owner._parameters[name.rsplit(".", 1)[-1]] = nn.Parameter(param.detach().clone(), requires_grad=True)


def _install_ready_check(gm: fx.GraphModule) -> None:
    """Training a site that still needs data (lora-ga before ``calibrate``) is an error."""
    if not any(a.needs_calibration for a in adapters_of(gm).values()):
        return

    def check(module, args, kwargs):
        if module.training and torch.is_grad_enabled() and not getattr(module, "_rosafx_calibrating", False):
            for adapter in adapters_of(module).values():
                adapter.check_ready("train")

    gm.register_forward_pre_hook(check, with_kwargs=True)
