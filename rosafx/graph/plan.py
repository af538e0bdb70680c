"""The plan: which site gets which method config, and which modules train in full.

``transform`` makes a plan from the user's rules (``Plan.from_rules``, through the one
matcher in rosafx/graph/rules.py); a saved adapter stores the plan (``to_dict``) and ``load``
rebuilds it (``from_dict``) without going through rules again; HF PEFT reading builds one
from the PEFT config. Applying a plan to a captured graph is rosafx/pipeline/transform.py's job.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rosafx.errors import RosafxError
from rosafx.methods import FULL, get_method, parse_config
from rosafx.methods.base import MethodConfig
from rosafx.graph.rules import best_match, nearest_paths, no_match_error, parsed_rules, resolve
from rosafx.graph.sites import Site


@dataclass
class Plan:
    sites: dict[str, MethodConfig] = field(default_factory=dict)  # site path -> config
    full: list[str] = field(default_factory=list)                  # module paths trained as is

    def to_dict(self) -> dict:
        return {"sites": {p: c.to_dict() for p, c in self.sites.items()}, "full": list(self.full)}

    @classmethod
    def from_dict(cls, raw: dict) -> "Plan":
        sites = {}
        for path, config in raw.get("sites", {}).items():
            parsed = parse_config(config)
            if parsed is FULL:
                raise RosafxError(f"Site '{path}' names method 'full'; a whole module is listed under 'full'.")
            sites[path] = parsed
        return cls(sites, list(raw.get("full", [])))

    @classmethod
    def from_rules(cls, rules: dict, sites: list[Site], modules: dict[str, str]) -> "Plan":
        """``modules``: every module path that holds parameters -> its class name ("" if unknown).
        A site goes to the rule that selects it most strongly; a module trains in full when
        its strongest rule says ``full`` (a module inside it is part of it)."""
        keys = [(k, None if v is None else parse_config(v)) for k, v in parsed_rules(rules)]
        plan = cls()
        plan.sites = {path: config for path, config in resolve(keys, sites).items() if config is not FULL}
        if any(v is FULL for _, v in keys):
            for path in sorted(modules):
                found = best_match(keys, path, modules[path])
                if found is not None and found[1] is FULL and not any(path.startswith(m + ".") for m in plan.full):
                    plan.full.append(path)
        if not sites and not plan.full:
            raise no_match_error(rules, sites)  # the model has none: say so, not "no rule matches"
        _check_every_key_selects(rules, keys, sites, modules)
        if not plan.sites and not plan.full:
            raise no_match_error(rules, sites)  # only exclusions
        return plan

    def methods(self) -> list[str]:
        return sorted({c.method for c in self.sites.values()})

    def check(self, sites: list[Site], modules: dict[str, str]) -> None:
        """Every planned site and module exists, no adapted site lies in a full module, and
        no rank is wider than its site (checked before any tensor is allocated)."""
        by_path = {s.path: s for s in sites}
        missing = sorted(set(self.sites) - set(by_path)) + sorted(set(self.full) - set(modules))
        if missing:
            raise RosafxError(f"The plan names {missing[:4]}{' ...' if len(missing) > 4 else ''}, which this model "
                              "lacks. Load the adapter onto the model it was trained from.")
        for path in self.sites:
            if any(by_path[path].weight_name.startswith(f + ".") for f in self.full):
                raise RosafxError(f"Site '{path}' is both adapted and inside a 'full' module. "
                                  "Exclude it from one of the rules.")
        check_ranks(sites, self.sites)


def _check_every_key_selects(rules: dict, keys: list, sites: list[Site], modules: dict[str, str]) -> None:
    """A key that selects nothing is usually a typo or a path prefix the model lacks
    (``encoder.`` vs ``bert.encoder.``): an error, whatever else the rules select, so that
    ``train --target TYPO`` (whose rules also train the new head in full) fails as ``adapt``
    does rather than train less than asked. An exclusion (``None``) may select nothing."""
    for raw, (key, config) in zip(rules, keys):
        if config is None:
            continue
        if config is FULL:
            if not any(key.selects(p, t) for p, t in modules.items()):
                near = ", ".join(nearest_paths([raw], sorted(modules), n=3))
                raise RosafxError(f"The rule '{raw}' (method 'full') matches no module; nearest: {near}. "
                                  "Run `rosafx inspect MODEL` to list the model's paths.")
        elif not any(key.selects(s.path, s.module_type) for s in sites):
            near = ", ".join(nearest_paths([raw], [s.path for s in sites], n=3))
            raise RosafxError(f"The rule '{raw}' matches no linear site; nearest: {near}. "
                              "Run `rosafx inspect MODEL` to list every site.")


def check_ranks(sites: list[Site], adapted: dict[str, MethodConfig]) -> None:
    for site in sites:
        config = adapted.get(site.path)
        rank = getattr(config, "rank", None)
        if isinstance(rank, int) and rank > (limit := get_method(config.method).rank_limit(site)):
            raise RosafxError(f"{config.method}: rank {rank} on '{site.path}' (out x in = {site.out_features} x "
                              f"{site.in_features}) exceeds the largest useful rank {limit}. Use a smaller rank.")
