"""``rosafx.transform``: the pipeline, top to bottom."""
from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch
from torch import fx, nn

from rosafx.passes.dropout import dropout_follows_mode
from rosafx.passes.insert import adapters_of, insert_adapters
from rosafx.passes.insert_experts import check_expert_methods, insert_expert_adapters

from . import safe_regex
from .capture import capture
from .errors import RosafxError
from .methods import FULL, get_method, parse_config
from .methods.base import MethodConfig
from .rules import match_strength, nearest_paths, no_match_error, resolve
from .sites import Site, find_sites


def transform(model: nn.Module, rules: dict, *, example_inputs: Any = None) -> fx.GraphModule:
    """Capture ``model`` as an FX graph and insert adapters on the sites that ``rules`` select.

    ``rules`` maps a key to a config (``{"method": "lora", "rank": 8, "alpha": 16}``, a method
    config object, ``{"method": "full"}`` to train a whole module as is, or ``None`` to
    exclude). Keys, weakest to strongest; the strongest match wins, and among keys of one
    kind the first listed wins:

      1. a module class (``nn.Linear``) or ``"type:Conv1D"``;
      2. a regular expression that fully matches the site path;
      3. a dot-suffix of the path (``"query"``);
      4. the exact path.

    The user's model is never changed. The result is called like the model and only
    adapter (and ``full``) parameters require grad. A model that torch.export cannot trace
    as a whole is captured in parts (``rosafx.partial``), with a warning.
    """
    try:
        gm, args, kwargs = capture(model, example_inputs)
    except RosafxError as exc:
        if exc.__cause__ is None or not isinstance(model, nn.Module):
            raise  # bad inputs, not a model that does not trace
        from .partial import transform_partly
        reason = str(exc).splitlines()[0]
        adapted = transform_partly(model, rules, example_inputs, reason=reason)
        warnings.warn(f"rosafx: {reason} -- captured the submodules that export instead "
                      "(see docs/architectures.md; `rosafx inspect` lists the parts).", stacklevel=2)
        return adapted
    gm = dropout_follows_mode(gm)                       # aten.dropout -> nn.Dropout (honours train())
    sites = find_sites(gm)                              # linear/addmm calls on a 2-D parameter
    parsed = {key: (None if cfg is None else parse_config(cfg)) for key, cfg in rules.items()} \
        if isinstance(rules, dict) else rules
    chosen = resolve(parsed, sites)                     # site path -> config (None excluded)
    full_paths = _full_module_paths(gm, parsed, sites)  # modules trained as is
    adapted = {p: c for p, c in chosen.items() if c is not FULL}
    if not adapted and not full_paths:
        raise no_match_error(rules, sites)
    _warn_unused_keys(parsed, sites, full_paths)
    _check_no_overlap(gm, adapted, sites, full_paths)
    gm = _insert(gm, sites, adapted)                    # sites -> rosafx op nodes
    _make_trainable(gm, full_paths)                     # full modules: own copy, requires_grad
    gm.meta["rosafx"] = {
        "sites": {p: {"config": c.to_dict(), "weight_name": _site(sites, p).weight_name} for p, c in adapted.items()},
        "full": full_paths,
        "example_inputs": (args, kwargs),
        "fingerprint": fingerprint(gm, [_site(sites, p).weight_name for p in adapted]),
    }
    _install_ready_check(gm)
    return gm


def _warn_unused_keys(rules: dict, sites: list[Site], full_paths: list[str]) -> None:
    """A key that selects nothing is usually a typo or a path prefix the model lacks
    (``encoder.`` vs ``bert.encoder.``): say so rather than train less than asked."""
    for key, config in rules.items():
        if config is None or config is FULL:
            continue
        if not any(match_strength(key, site) for site in sites):
            near = ", ".join(nearest_paths([key], sites, n=3))
            warnings.warn(f"rosafx: rule {key!r} matches no linear site (nearest: {near}).", stacklevel=3)


def _site(sites: list[Site], path: str) -> Site:
    return next(s for s in sites if s.path == path)


# The largest rank a method may have on a site, checked before any tensor is allocated.
# A low-rank factor wider than the layer adds nothing; VeRA's shared random pair is often
# wider than the layer (the paper uses r = 1024 on 768-wide layers), so it gets room.
RANK_LIMITS = {"vera": lambda site: 4 * max(site.in_features, site.out_features)}


def _rank_limit(method: str, site: Site) -> int:
    limit = RANK_LIMITS.get(method)
    return limit(site) if limit else min(site.in_features, site.out_features)


def check_ranks(sites: list[Site], adapted: dict[str, MethodConfig]) -> None:
    for site in sites:
        config = adapted.get(site.path)
        rank = getattr(config, "rank", None)
        if isinstance(rank, int) and rank > _rank_limit(config.method, site):
            raise RosafxError(f"{config.method}: rank {rank} on '{site.path}' (out x in = {site.out_features} x "
                              f"{site.in_features}) exceeds the largest useful rank "
                              f"{_rank_limit(config.method, site)}. Use a smaller rank.")


def _insert(gm: fx.GraphModule, sites: list[Site], adapted: dict[str, MethodConfig]) -> fx.GraphModule:
    check_ranks(sites, adapted)
    by_method: dict[str, list[tuple[Site, MethodConfig]]] = {}
    for site in sites:
        if site.path in adapted:
            by_method.setdefault(adapted[site.path].method, []).append((site, adapted[site.path]))
    for method_id, pairs in by_method.items():
        check_expert_methods(pairs)
        adapters = get_method(method_id).build(gm, pairs)
        calls = [(s, a) for s, a in zip([s for s, _ in pairs], adapters) if s.expert is None]
        experts = [(s, a) for s, a in zip([s for s, _ in pairs], adapters) if s.expert is not None]
        if calls:
            gm = insert_adapters(gm, [s for s, _ in calls], [a for _, a in calls])
        if experts:
            if not hasattr(gm, "rosafx_adapters"):
                gm = insert_adapters(gm, [], [])
            gm = insert_expert_adapters(gm, [s for s, _ in experts], [a for _, a in experts])
    return gm


def _module_paths(gm: fx.GraphModule) -> list[str]:
    paths = {""}
    for name, _ in gm.named_parameters(remove_duplicate=False):
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            paths.add(".".join(parts[:i]))
    return sorted(paths - {""})


def _full_module_paths(gm: fx.GraphModule, rules: dict, sites: list[Site]) -> list[str]:
    full_keys = [k for k, c in rules.items() if c is FULL]
    if not full_keys:
        return []
    matched = []
    for path in _module_paths(gm):
        if any(_path_matches(key, path) for key in full_keys):
            if not any(path.startswith(m + ".") for m in matched):
                matched.append(path)
    return matched


def _path_matches(key: Any, path: str) -> bool:
    if not isinstance(key, str) or key.startswith("type:"):
        return False
    return key == path or path.endswith("." + key) or safe_regex.fullmatch(key, path, source="rule pattern")


def _check_no_overlap(gm, adapted: dict, sites: list[Site], full_paths: list[str]) -> None:
    for site in sites:
        if site.path in adapted and any(site.weight_name.startswith(f + ".") for f in full_paths):
            raise RosafxError(f"Site '{site.path}' is both adapted and inside a 'full' module. "
                              "Exclude it from one of the rules.")


def _make_trainable(gm: fx.GraphModule, full_paths: list[str]) -> None:
    for path in full_paths:
        module = gm.get_submodule(path)
        for name, param in list(module.named_parameters()):
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            owner._parameters[name.rsplit(".", 1)[-1]] = nn.Parameter(param.detach().clone(), requires_grad=True)


def fingerprint(gm: fx.GraphModule, weight_names: list[str]) -> str:
    """A hash of the base weights the adapters were built on (shape, dtype and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(weight_names):
        weight = gm.get_parameter(name).detach()
        digest.update(f"{name}:{tuple(weight.shape)}:{weight.dtype}".encode())
        digest.update(weight.contiguous().view(torch.uint8).numpy().tobytes() if weight.device.type == "cpu"
                      else weight.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _install_ready_check(gm: fx.GraphModule) -> None:
    """Training a site that still needs data (lora-ga before ``calibrate``) is an error."""
    if not any(a.needs_calibration for a in adapters_of(gm).values()):
        return

    def check(module, args, kwargs):
        if module.training and torch.is_grad_enabled() and not getattr(module, "_rosafx_calibrating", False):
            for adapter in adapters_of(module).values():
                adapter.check_ready("train")

    gm.register_forward_pre_hook(check, with_kwargs=True)
