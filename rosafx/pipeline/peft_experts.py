"""HF PEFT ``target_parameters`` <-> rosafx expert sites (LoRA on 3-D MoE weights).

PEFT adapts a whole E x out x in parameter with one ``lora.ParamWrapper``: ``lora_A.weight``
is (r·E) x in, expert e's A the rows e·r ... e·r + r - 1; ``lora_B.weight`` is out x (r·E),
read as out x r x E, so expert e's B is column block ``[:, j·E + e]``; ΔW_e = alpha/r · B_e·A_e
(peft/tuners/lora/layer.py, ``ParamWrapper.get_delta_weight``). Several parameters of one
module nest: the one registered first is wrapped first, so it sits deepest and its tensors
are saved under ``<module>.base_layer.`` once per later wrapper.
"""
from __future__ import annotations

import torch
from torch import fx

from rosafx.passes.insert_experts import expert_nodes
from rosafx.graph.rules import Key, Kind

from rosafx.graph.adapted_graph import EXPERT_GROUP, adapter_tensor_name, adapters_of
from rosafx.errors import RosafxError
from rosafx.pipeline.adapted_model import adapted_model

PREFIX = "base_model.model."


def expert_groups(adapted: fx.GraphModule) -> dict[str, dict[int, str]]:
    """Adapted expert parameter -> {expert index: site path}."""
    return {n.meta[EXPERT_GROUP]["weight_name"]: dict(n.meta[EXPERT_GROUP]["sites"])
            for gm in adapted_model(adapted).graphs for n in expert_nodes(gm.graph)}


def _tensor_prefix(gm: fx.GraphModule, weight_name: str, targeted: set[str]) -> str:
    """The key prefix PEFT saves ``weight_name``'s wrapper under (nesting by registration order)."""
    owner, _, short = weight_name.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    order = [n for n in module._parameters if (f"{owner}.{n}" if owner else n) in targeted]
    depth = len(order) - 1 - order.index(short)
    return f"{PREFIX}{owner}" + ".base_layer" * depth


def experts_to_peft(adapted: fx.GraphModule, configs: dict, rank: int, alpha: float) -> tuple[list[str], dict]:
    """(target_parameters, tensors) for every adapted expert parameter."""
    adapters = adapters_of(adapted)
    groups = expert_groups(adapted)
    tensors = {}
    for weight_name, experts in groups.items():
        count = adapted.get_parameter(weight_name).shape[0]
        if sorted(experts) != list(range(count)):
            raise RosafxError(f"HF PEFT adapts all {count} experts of '{weight_name}' or none; rosafx adapted "
                              f"{len(experts)}. Save with format='rosafx' or select every expert.")
        for path in experts.values():
            if configs[path]["rank"] != rank or configs[path]["alpha"] != alpha:
                raise RosafxError(f"HF PEFT's target_parameters use the global r/lora_alpha; expert site '{path}' "
                                  f"has rank {configs[path]['rank']}, alpha {configs[path]['alpha']} "
                                  f"(global {rank}, {alpha}).")
        pieces = [adapters[experts[e]] for e in range(count)]
        prefix = _tensor_prefix(adapted, weight_name, set(groups))
        tensors[f"{prefix}.lora_A.weight"] = torch.cat([a.lora_A.detach() for a in pieces], dim=0)
        tensors[f"{prefix}.lora_B.weight"] = torch.stack([a.lora_B.detach() for a in pieces], dim=-1) \
            .reshape(pieces[0].lora_B.shape[0], -1)
    return sorted(groups), tensors


def _targeted(weight_name: str, target_parameters) -> bool:
    """PEFT's rule for ``target_parameters``: the parameter's name or a dot-suffix of it."""
    return any(Key(Kind.SUFFIX, t).selects(weight_name) for t in target_parameters)


def experts_from_peft(config: dict, tensors: dict, probe: fx.GraphModule, expert_sites: list) -> tuple[dict, dict]:
    """Site configs (path -> config dict) and tensors to install for the expert sites that
    ``target_parameters`` name."""
    targets = config.get("target_parameters") or []
    by_weight: dict[str, list] = {}
    for site in expert_sites:
        if _targeted(site.weight_name, targets):
            by_weight.setdefault(site.weight_name, []).append(site)
    planned, installs = {}, {}
    for weight_name, sites in by_weight.items():
        prefix = _tensor_prefix(probe, weight_name, set(by_weight))
        a_key, b_key = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        if a_key not in tensors or b_key not in tensors:
            raise RosafxError(f"HF PEFT adapter targets '{weight_name}' but has no {a_key} / {b_key}.")
        count = len(sites)
        lora_a, lora_b = tensors[a_key], tensors[b_key]
        rank = lora_a.shape[0] // count
        per_b = lora_b.reshape(lora_b.shape[0], rank, count)
        for site in sites:
            planned[site.path] = {
                "method": "lora", "rank": int(rank), "alpha": float(config["lora_alpha"]), "dropout": 0.0,
                "rslora": bool(config.get("use_rslora", False))}
            installs[adapter_tensor_name(site.path, "lora_A")] = lora_a[site.expert * rank:(site.expert + 1) * rank]
            installs[adapter_tensor_name(site.path, "lora_B")] = per_b[:, :, site.expert].contiguous()
    return planned, installs
