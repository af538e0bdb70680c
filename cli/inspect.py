"""rosafx inspect MODEL [rule options]: the model's sites and the plan the rules make.

One capture: capture -> sites (-> plan -> apply, to count what would train).
"""
from __future__ import annotations

from rich.console import Console
from rich.table import Table
from torch import nn

from rosafx.graph.adapted_graph import adapters_of, plan_of
from rosafx.recipes.loading import identify, open_model
from rosafx.graph.plan import Plan
from rosafx.graph.sites import Captured
from rosafx.pipeline.transform import apply, capture_sites

from rosafx.cli.options import (AlphaOpt, MethodOpt, ModelArg, OptionOpt, RankOpt, RulesOpt, TargetOpt, TrustOpt,
                                build_rules)


def _console() -> Console:
    """Full site paths matter more than a tidy width: never truncate them in a pipe or log."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def site_form_label(site) -> str:
    """The op a site was found as, and W's stored layout when it is in x out."""
    return site.form + (" (W in x out)" if site.stored_in_out else "")


def _options(config) -> str:
    return " ".join(f"{k}={v}" for k, v in config.to_dict().items() if k != "method")


def print_sites(adapted: nn.Module, all_sites=None) -> None:
    """The plan, one row per site (and per ``full`` module), with what each trains."""
    adapters = adapters_of(adapted)
    plan = plan_of(adapted)
    table = Table(title="plan: linear sites")
    for column in ("path", "op", "shape (out x in)", "method", "options", "trainable"):
        table.add_column(column, justify="right" if column == "trainable" else "left")
    total = 0
    rows = all_sites if all_sites is not None else []
    seen = {s.path for s in rows}
    for site in rows:
        config = plan.sites.get(site.path)
        count = adapters[site.path].trainable_count() if config is not None else 0
        total += count
        table.add_row(site.path, site_form_label(site), f"{site.out_features} x {site.in_features}",
                      config.method if config is not None else "-", _options(config) if config is not None else "",
                      f"{count:,}")
    for path, config in plan.sites.items():
        if path not in seen:
            count = adapters[path].trainable_count()
            total += count
            table.add_row(path, "", "", config.method, _options(config), f"{count:,}")
    for path in plan.full:
        count = sum(p.numel() for p in adapted.get_submodule(path).parameters())
        total += count
        table.add_row(path, "module", "", "full", "", f"{count:,}")
    base = sum(p.numel() for n, p in adapted.named_parameters() if not p.requires_grad and "rosafx" not in n)
    console = _console()
    console.print(table)
    console.print(f"adapted sites: {len(plan.sites)}   trainable parameters: {total:,}   "
                  f"frozen base parameters: {base:,} ({100 * total / max(base, 1):.3f} % trainable)")


def _print_parts(captured: Captured) -> None:
    """When the whole model does not export: which parts are graphs and why the rest is not."""
    wrapper = captured.module
    table = Table(title="captured in parts: the whole model does not export")
    for column in ("module", "runs as", "why"):
        table.add_column(column)
    for path in wrapper.part_paths:
        table.add_row(path, "graph", "")
    for path, reason in wrapper.python.items():
        table.add_row(path or "(model)", "python", reason)
    _console().print(table)


def inspect(model: ModelArg, method: MethodOpt = None, target: TargetOpt = None, rank: RankOpt = None,
            alpha: AlphaOpt = None, option: OptionOpt = None, rules: RulesOpt = None,
            trust_pickle: TrustOpt = False) -> None:
    """List MODEL's linear sites; with rule options, show the plan the rules make.

    Example: rosafx inspect ./bert --method lora --target query --target value
    """
    source = identify(model)
    module, example_inputs = open_model(source, trust_pickle=trust_pickle)
    captured = capture_sites(module, example_inputs)
    if captured.partial_reason is not None:
        _print_parts(captured)
    sites = captured.sites
    if method is None and rules is None:
        table = Table(title="linear sites")
        for column in ("path", "op", "shape (out x in)", "module type"):
            table.add_column(column)
        for site in sites:
            table.add_row(site.path, site_form_label(site),
                          f"{site.out_features} x {site.in_features}", site.module_type.split(".")[-1])
        _console().print(table)
        _console().print(f"{len(sites)} sites. Add --method (and --target) to see what rules would select.")
        return
    plan = Plan.from_rules(build_rules(method, target, rank, alpha, option, rules), sites, captured.modules)
    print_sites(apply(captured, plan), sites)
