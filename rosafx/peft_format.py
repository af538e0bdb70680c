"""HF PEFT interop: write a directory ``PeftModel.from_pretrained`` loads, and read one.

Tables, not branches: ``PEFT_WRITERS`` maps a rosafx method id to a function that gives
PEFT's config fields and tensors; ``PEFT_READERS`` maps a PEFT ``peft_type`` to a function
that gives rosafx rules and the tensors to install.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file
from torch import fx, nn

from rosafx.passes.insert import ADAPTERS, adapter_key, adapters_of

from .atomic import atomic_directory
from .errors import RosafxError
from .files import read_json, read_safetensors
from .outputs import check_output

PREFIX = "base_model.model."
PEFT_DEFAULT_LORA_ALPHA = 8  # peft.LoraConfig's default, used when a config omits lora_alpha
CONFIG_NAME, TENSORS_NAME = "adapter_config.json", "adapter_model.safetensors"


def _common_value(values: dict[str, object]) -> tuple[object, dict]:
    """PEFT has one global value plus a per-module pattern table for the exceptions."""
    counts: dict[object, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    common = max(counts, key=counts.get)
    return common, {path: v for path, v in values.items() if v != common}


def _lora_to_peft(adapted: fx.GraphModule, sites: dict) -> tuple[dict, dict]:
    configs = {p: s["config"] for p, s in sites.items()}
    rank, rank_pattern = _common_value({p: c["rank"] for p, c in configs.items()})
    alpha, alpha_pattern = _common_value({p: c["alpha"] for p, c in configs.items()})
    for field in ("dropout", "rslora"):
        if len({c[field] for c in configs.values()}) > 1:
            raise RosafxError(f"HF PEFT stores one '{field}' for all LoRA sites; these sites differ in it.")
    first = next(iter(configs.values()))
    from .peft_experts import expert_groups, experts_to_peft
    expert_paths = {p for group in expert_groups(adapted).values() for p in group.values()}
    target_parameters, tensors = experts_to_peft(adapted, configs, rank, alpha)
    rank_pattern = {p: v for p, v in rank_pattern.items() if p not in expert_paths}
    alpha_pattern = {p: v for p, v in alpha_pattern.items() if p not in expert_paths}
    transposed = {p for p, s in sites.items() if _is_transposed(adapted, p)}
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "lora_dropout": first["dropout"], "use_rslora": first["rslora"],
        "target_modules": sorted(set(configs) - expert_paths), "fan_in_fan_out": bool(transposed), "bias": "none",
        "init_lora_weights": True, "use_dora": False, "lora_bias": False,
    }
    if target_parameters:
        config["target_parameters"] = target_parameters
    adapters = adapters_of(adapted)
    for path in sorted(set(configs) - expert_paths):
        adapter = adapters[adapter_key(path)]
        tensors[f"{PREFIX}{path}.lora_A.weight"] = adapter.lora_A.detach()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = adapter.lora_B.detach()
    return config, tensors


def _is_transposed(adapted: fx.GraphModule, path: str) -> bool:
    from .partial import graphs_of
    return any(n.meta["rosafx"]["transposed"] for g in graphs_of(adapted) for n in g.nodes
               if n.op == "call_function" and n.meta.get("rosafx", {}).get("site") == path)


def _vera_to_peft(adapted: fx.GraphModule, sites: dict) -> tuple[dict, dict]:
    """PEFT's VeRA stores the shared pair once at ``base_model.vera_A`` / ``vera_B``."""
    configs = {p: s["config"] for p, s in sites.items()}
    for field in ("dropout", "d_initial"):
        if len({c[field] for c in configs.values()}) > 1:
            raise RosafxError(f"HF PEFT stores one '{field}' for all VeRA sites; these sites differ in it.")
    first = next(iter(configs.values()))
    config = {
        "peft_type": "VERA", "r": first["rank"], "projection_prng_key": first["seed"], "save_projection": True,
        "vera_dropout": first["dropout"], "d_initial": first["d_initial"], "target_modules": sorted(configs),
        "fan_in_fan_out": any(_is_transposed(adapted, p) for p in configs), "bias": "none", "init_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
    }
    adapters = adapters_of(adapted)
    tensors = {"base_model.vera_A": adapted.rosafx_shared.vera_A.detach(),
               "base_model.vera_B": adapted.rosafx_shared.vera_B.detach()}
    for path in configs:
        adapter = adapters[adapter_key(path)]
        tensors[f"{PREFIX}{path}.vera_lambda_d"] = adapter.lambda_d.detach()
        tensors[f"{PREFIX}{path}.vera_lambda_b"] = adapter.lambda_b.detach()
    return config, tensors


PEFT_WRITERS: dict[str, Callable[[fx.GraphModule, dict], tuple[dict, dict]]] = {
    "lora": _lora_to_peft,
    "vera": _vera_to_peft,
}


def save_peft(adapted: fx.GraphModule, directory) -> None:
    meta = adapted.meta["rosafx"]
    methods = {s["config"]["method"] for s in meta["sites"].values()}
    if len(methods) != 1 or next(iter(methods)) not in PEFT_WRITERS:
        raise RosafxError(f"format='peft' writes one method of {sorted(PEFT_WRITERS)} per directory; this model "
                          f"uses {sorted(methods)}. Save it with format='rosafx'.")
    config, tensors = PEFT_WRITERS[next(iter(methods))](adapted, meta["sites"])
    config.update({"task_type": None, "base_model_name_or_path": None, "revision": None,
                   "inference_mode": True, "modules_to_save": meta["full"] or None})
    for path in meta["full"]:
        for name, value in adapted.get_submodule(path).state_dict().items():
            tensors[f"{PREFIX}{path}.{name}"] = value.detach()
    check_output(directory)
    with atomic_directory(directory) as tmp:
        save_file({k: v.contiguous().cpu().clone() for k, v in tensors.items()}, str(tmp / TENSORS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False))


# ---------------------------------------------------------------- reading
UNSUPPORTED_IF_SET = (  # PEFT fields that rosafx cannot honour when they are set
    "use_dora", "lora_bias", "layers_to_transform", "layers_pattern", "layer_replication",
    "trainable_token_indices", "alora_invocation_tokens", "exclude_modules", "use_qalora", "use_bdlora",
)


def _check_supported(config: dict) -> None:
    for field in UNSUPPORTED_IF_SET:
        if config.get(field) not in (None, False, {}, [], ""):
            raise RosafxError(f"HF PEFT adapter field '{field}' = {config[field]!r} is not supported by rosafx.")
    if config.get("bias", "none") != "none":
        raise RosafxError(f"HF PEFT adapter field 'bias' = {config['bias']!r} is not supported (only 'none').")


def check_all_used(config: dict, tensors: dict, installs: dict, rules: dict, sites: list, tensors_path,
                   used_keys: set[str] = frozenset()) -> None:
    """PEFT loads what its config targets; rosafx must neither drop a tensor silently (a
    module this model lacks, or one ``target_modules`` does not select) nor leave a
    targeted site without its weights."""
    from .serialize import exact_path_rule
    used = {id(v) for v in installs.values()}
    unused = sorted(k for k, v in tensors.items() if id(v) not in used and k not in used_keys)
    if unused:
        shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
        raise RosafxError(f"{tensors_path} has tensors for modules this model lacks or rosafx cannot load: {shown}. "
                          "Use the adapter with the model it was trained for.")
    targets = _peft_targets(config)
    selected = {s.path for s in sites if _peft_selects(targets, s.path)}
    adapted = {s.path for s in sites
               if rules.get(exact_path_rule(s.path), {}).get("method") not in (None, "full")}
    outside = sorted(adapted - selected)
    if outside:
        raise RosafxError(f"{tensors_path} has weights for {outside[:4]}, which target_modules {targets!r} does not "
                          "select (HF PEFT would ignore them): the adapter config and tensors disagree.")
    missing = sorted(selected - adapted)
    if missing:
        raise RosafxError(f"target_modules {targets!r} selects {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                          f"but {tensors_path} has no weights for them: the adapter is incomplete or for another "
                          "model.")


def _peft_selects(targets, path: str) -> bool:
    """PEFT's rule: a string target_modules is a regex that must fully match the path; a
    list entry matches the path or a dot-suffix of it."""
    from . import safe_regex
    if isinstance(targets, str):
        return safe_regex.fullmatch(targets, path, source="PEFT target_modules")
    return any(path == key or path.endswith("." + key) for key in targets)


def _peft_targets(config: dict) -> object:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return targets  # PEFT: a string is a regular expression that must fully match
    if not targets and not config.get("target_parameters"):
        raise RosafxError("HF PEFT adapter has no 'target_modules'.")
    if targets is None:
        return []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise RosafxError(f"HF PEFT 'target_modules' must be a regex string or a list of module names, "
                          f"got {targets!r}.")
    return list(targets)


def _lora_from_peft(config: dict, tensors: dict, site_paths: list[str]) -> tuple[dict, dict]:
    from .serialize import exact_path_rule
    alphas = config.get("alpha_pattern") or {}  # ranks come from the tensors' shapes
    if not isinstance(alphas, dict):
        raise RosafxError(f"HF PEFT adapter field 'alpha_pattern' must be an object, got {alphas!r}.")
    rules, installs = {}, {}
    for path in site_paths:
        a_key, b_key = f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"
        if a_key not in tensors:
            continue
        if b_key not in tensors:
            raise RosafxError(f"HF PEFT adapter has {a_key} but no {b_key}: the file is incomplete.")
        if tensors[a_key].dim() != 2:
            raise RosafxError(f"HF PEFT tensor {a_key} has shape {tuple(tensors[a_key].shape)}, expected (r, in).")
        rank = int(tensors[a_key].shape[0])
        alpha = _pattern_value(alphas, path, config.get("lora_alpha", PEFT_DEFAULT_LORA_ALPHA))
        rules[exact_path_rule(path)] = {"method": "lora", "rank": rank, "alpha": alpha,  # types: Config.from_dict
                                        "dropout": config.get("lora_dropout", 0.0),
                                        "rslora": config.get("use_rslora", False)}
        installs[f"{ADAPTERS}.{adapter_key(path)}.lora_A"] = tensors[a_key]
        installs[f"{ADAPTERS}.{adapter_key(path)}.lora_B"] = tensors[b_key]
    return rules, installs


def _pattern_value(pattern: dict, path: str, default):
    from . import safe_regex
    for key, value in pattern.items():
        if path == key or path.endswith("." + key) or safe_regex.fullmatch(key, path, source="PEFT pattern"):
            return value
    return default


def _vera_from_peft(config: dict, tensors: dict, site_paths: list[str]) -> tuple[dict, dict]:
    """Without a saved pair (save_projection=False) the pair is drawn again from the seed,
    as PEFT itself does."""
    from .serialize import SHARED, exact_path_rule
    rules, installs = {}, {}
    for path in site_paths:
        d_key, b_key = f"{PREFIX}{path}.vera_lambda_d", f"{PREFIX}{path}.vera_lambda_b"
        if d_key not in tensors:
            continue
        if b_key not in tensors:
            raise RosafxError(f"HF PEFT adapter has {d_key} but no {b_key}: the file is incomplete.")
        rules[exact_path_rule(path)] = {"method": "vera", "rank": int(tensors[d_key].shape[0]),
                                        "d_initial": config.get("d_initial", 0.1),
                                        "seed": config.get("projection_prng_key", 0),
                                        "dropout": config.get("vera_dropout", 0.0)}
        installs[f"{ADAPTERS}.{adapter_key(path)}.lambda_d"] = tensors[d_key]
        installs[f"{ADAPTERS}.{adapter_key(path)}.lambda_b"] = tensors[b_key]
    if rules and "base_model.vera_A" in tensors:
        installs[f"{SHARED}.vera_A"] = tensors["base_model.vera_A"]
        installs[f"{SHARED}.vera_B"] = tensors["base_model.vera_B"]
    return rules, installs


PEFT_READERS: dict[str, Callable[[dict, dict, list[str]], tuple[dict, dict]]] = {
    "LORA": _lora_from_peft,
    "VERA": _vera_from_peft,
}


def load_peft(model: nn.Module, directory, *, example_inputs=None) -> fx.GraphModule:

    from .serialize import exact_path_rule, install_tensors

    from .transform import transform
    directory = Path(directory)
    config = read_json(directory / CONFIG_NAME, "the HF PEFT adapter config")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in PEFT_READERS:
        raise RosafxError(f"HF PEFT adapter type '{peft_type}' is not supported; rosafx reads {sorted(PEFT_READERS)}.")
    _check_supported(config)
    tensors_path = directory / TENSORS_NAME
    if not tensors_path.exists():
        raise RosafxError(f"{directory} has no {TENSORS_NAME} (rosafx reads safetensors PEFT adapters only).")
    tensors = read_safetensors(tensors_path, "the HF PEFT adapter tensors")
    from .partial import probe_sites
    sites, probe = probe_sites(model, example_inputs)
    site_paths = [s.path for s in sites if s.expert is None]
    try:
        rules, installs = PEFT_READERS[peft_type](config, tensors, site_paths)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RosafxError(f"{directory / CONFIG_NAME} has a field of the wrong type ({exc}); "
                          "it is not a valid HF PEFT adapter config.") from exc
    expert_keys: set[str] = set()
    if config.get("target_parameters"):
        if peft_type != "LORA":
            raise RosafxError(f"HF PEFT field 'target_parameters' is read for LORA adapters only, not {peft_type}.")
        from .peft_experts import experts_from_peft
        expert_sites = [s for s in sites if s.expert is not None]
        expert_rules, expert_installs = experts_from_peft(config, tensors, probe, expert_sites)
        rules.update(expert_rules)
        installs.update(expert_installs)
        owners = {s.weight_name.rpartition(".")[0] for s in expert_sites if exact_path_rule(s.path) in expert_rules}
        expert_keys = {k for k in tensors if any(k.startswith(f"{PREFIX}{o}.") for o in owners)
                       and k.endswith((".lora_A.weight", ".lora_B.weight"))}
    if not rules:
        raise RosafxError(f"No tensor in {tensors_path} names a linear site of this model.")
    modules_to_save = config.get("modules_to_save") or []
    if not isinstance(modules_to_save, list) or not all(isinstance(p, str) for p in modules_to_save):
        raise RosafxError(f"HF PEFT adapter field 'modules_to_save' must be a list of module names, "
                          f"got {modules_to_save!r}.")
    for path in modules_to_save:
        rules[exact_path_rule(path)] = {"method": "full"}
        prefix = f"{PREFIX}{path}."
        installs.update({f"full.{path}.{k[len(prefix):]}": v for k, v in tensors.items() if k.startswith(prefix)})
    check_all_used(config, tensors, installs, rules, [s for s in sites if s.expert is None], tensors_path,
                   expert_keys)
    adapted = transform(model, rules, example_inputs=example_inputs)
    install_tensors(adapted, installs)
    return adapted
