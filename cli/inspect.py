"""rosafx inspect MODEL [rule options]: a table of sites and what the rules select."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table
from torch import fx

import rosafx
from rosafx.capture import capture
from rosafx.loading import identify, open_model
from rosafx.passes.insert import adapter_key, adapters_of
from rosafx.sites import find_sites

def _console() -> Console:
    """Full site paths matter more than a tidy width: never truncate them in a pipe or log."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


from .options import AlphaOpt, MethodOpt, ModelArg, OptionOpt, RankOpt, RulesOpt, TargetOpt, TrustOpt, build_rules


def site_form_label(site) -> str:
    """The op a site was found as, and W's stored layout when it is in x out."""
    return site.form + (" (W in x out)" if site.transposed else "")


def print_sites(adapted: fx.GraphModule, all_sites=None) -> None:
    adapters = adapters_of(adapted)
    meta = adapted.meta["rosafx"]
    table = Table(title="linear sites")
    for column in ("path", "op", "shape (out x in)", "method", "trainable"):
        table.add_column(column, justify="right" if column == "trainable" else "left")
    total = 0
    rows = all_sites if all_sites is not None else []
    seen = {s.path for s in rows}
    for site in rows:
        adapter = adapters.get(adapter_key(site.path)) if site.path in meta["sites"] else None
        count = adapter.trainable_count() if adapter is not None else 0
        total += count
        table.add_row(site.path, site_form_label(site),
                      f"{site.out_features} x {site.in_features}",
                      meta["sites"][site.path]["config"]["method"] if adapter is not None else "-", f"{count:,}")
    for path, info in meta["sites"].items():
        if path not in seen:
            count = adapters[adapter_key(path)].trainable_count()
            total += count
            table.add_row(path, "", "", info["config"]["method"], f"{count:,}")
    for path in meta["full"]:
        count = sum(p.numel() for p in adapted.get_submodule(path).parameters())
        total += count
        table.add_row(path, "module", "", "full", f"{count:,}")
    base = sum(p.numel() for n, p in adapted.named_parameters() if not p.requires_grad and "rosafx" not in n)
    console = _console()
    console.print(table)
    console.print(f"adapted sites: {len(meta['sites'])}   trainable parameters: {total:,}   "
                  f"frozen base parameters: {base:,} ({100 * total / max(base, 1):.3f} % trainable)")


def _sites_or_parts(module, example_inputs) -> list:
    """The whole graph's sites; when the whole model does not export, print which parts are
    graphs and why the rest is not, and return the parts' sites."""
    from rosafx.errors import RosafxError
    from rosafx.partial import capture_partly, part_sites
    try:
        gm, _, _ = capture(module, example_inputs)
        return find_sites(gm)
    except RosafxError as exc:
        if exc.__cause__ is None:
            raise
        wrapper, _, _ = capture_partly(module, example_inputs, root_reason=str(exc).splitlines()[0])
    table = Table(title="captured in parts: the whole model does not export")
    for column in ("module", "runs as", "why"):
        table.add_column(column)
    for path in wrapper.part_paths:
        table.add_row(path, "graph", "")
    for path, reason in wrapper.python.items():
        table.add_row(path or "(model)", "python", reason)
    _console().print(table)
    return [s for _, _, sites in part_sites(wrapper) for s in sites]


def inspect(model: ModelArg, method: MethodOpt = None, target: TargetOpt = None, rank: RankOpt = None,
            alpha: AlphaOpt = None, option: OptionOpt = None, rules: RulesOpt = None,
            trust_pickle: TrustOpt = False) -> None:
    """List MODEL's linear sites; with rule options, show what each rule would insert.

    Example: rosafx inspect ./bert --method lora --target query --target value
    """
    source = identify(model)
    module, example_inputs = open_model(source, trust_pickle=trust_pickle)
    sites = _sites_or_parts(module, example_inputs)
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
    adapted = rosafx.transform(module, build_rules(method, target, rank, alpha, option, rules),
                               example_inputs=example_inputs)
    print_sites(adapted, sites)
