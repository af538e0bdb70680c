"""HF PEFT interop: write a directory ``PeftModel.from_pretrained`` loads, and read one.

Tables, not branches: a method declares the PEFT type that holds it (``Method.peft_type``);
``PEFT_WRITERS`` maps that type to a function that gives PEFT's config fields and tensors;
``PEFT_READERS`` maps a PEFT ``peft_type`` to a function
that gives the plan's site configs and the tensors to install. Loading captures the model
once: capture -> sites -> plan (from the PEFT config and tensors) -> apply -> install.
PEFT's ``target_modules`` and patterns go through rosafx's one matcher (rosafx/graph/rules.py):
a string is a REGEX key, a list entry a SUFFIX key.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file
from torch import fx, nn

from rosafx.graph.adapted_graph import SHARED, adapter_tensor_name, adapters_of, plan_of, stored_in_out
from rosafx.graph.adapter_tensors import install_tensors
from rosafx.io.atomic import atomic_directory
from rosafx.errors import RosafxError
from rosafx.io.reading import read_json, read_safetensors
from rosafx.io.outputs import check_output
from rosafx.pipeline.peft_experts import expert_groups, experts_from_peft, experts_to_peft
from rosafx.graph.plan import Plan
from rosafx.graph.rules import Key, Kind, best_match, parse_key
from rosafx.methods import REGISTRY, get_method
from rosafx.passes.bank import bank_whole
from rosafx.pipeline.transform import apply, capture_sites

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


def _lora_to_peft(adapted: fx.GraphModule, configs: dict) -> tuple[dict, dict]:
    """``configs``: site path -> config dict."""
    rank, rank_pattern = _common_value({p: c["rank"] for p, c in configs.items()})
    alpha, alpha_pattern = _common_value({p: c["alpha"] for p, c in configs.items()})
    for field in ("dropout", "rslora"):
        if len({c[field] for c in configs.values()}) > 1:
            raise RosafxError(f"HF PEFT stores one '{field}' for all LoRA sites; these sites differ in it.")
    first = next(iter(configs.values()))
    expert_paths = {p for group in expert_groups(adapted).values() for p in group.values()}
    target_parameters, tensors = experts_to_peft(adapted, configs, rank, alpha)
    rank_pattern = {p: v for p, v in rank_pattern.items() if p not in expert_paths}
    alpha_pattern = {p: v for p, v in alpha_pattern.items() if p not in expert_paths}
    in_out = {p for p in configs if stored_in_out(adapted, p)}
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "lora_dropout": first["dropout"], "use_rslora": first["rslora"],
        "target_modules": sorted(set(configs) - expert_paths), "fan_in_fan_out": bool(in_out), "bias": "none",
        "init_lora_weights": True, "use_dora": False, "lora_bias": False,
    }
    if target_parameters:
        config["target_parameters"] = target_parameters
    adapters = adapters_of(adapted)
    for path in sorted(set(configs) - expert_paths):
        adapter = adapters[path]
        tensors[f"{PREFIX}{path}.lora_A.weight"] = adapter.lora_A.detach()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = adapter.lora_B.detach()
    return config, tensors


def _vera_to_peft(adapted: fx.GraphModule, configs: dict) -> tuple[dict, dict]:
    """PEFT's VeRA stores the shared pair once at ``base_model.vera_A`` / ``vera_B``."""
    for field in ("dropout", "d_initial"):
        if len({c[field] for c in configs.values()}) > 1:
            raise RosafxError(f"HF PEFT stores one '{field}' for all VeRA sites; these sites differ in it.")
    first = next(iter(configs.values()))
    config = {
        "peft_type": "VERA", "r": first["rank"], "projection_prng_key": first["seed"], "save_projection": True,
        "vera_dropout": first["dropout"], "d_initial": first["d_initial"], "target_modules": sorted(configs),
        "fan_in_fan_out": any(stored_in_out(adapted, p) for p in configs), "bias": "none", "init_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
    }
    adapters = adapters_of(adapted)
    shared = getattr(adapted, SHARED)
    tensors = {"base_model.vera_A": shared.vera_A.detach(), "base_model.vera_B": shared.vera_B.detach()}
    for path in configs:
        adapter = adapters[path]
        tensors[f"{PREFIX}{path}.vera_lambda_d"] = adapter.lambda_d.detach()
        tensors[f"{PREFIX}{path}.vera_lambda_b"] = adapter.lambda_b.detach()
    return config, tensors


PEFT_WRITERS: dict[str, Callable[[fx.GraphModule, dict], tuple[dict, dict]]] = {
    "LORA": _lora_to_peft,
    "VERA": _vera_to_peft,
}


def save_peft(adapted: fx.GraphModule, directory) -> None:
    plan = plan_of(adapted)
    methods = plan.methods()
    peft_type = get_method(methods[0]).peft_type if len(methods) == 1 else None
    if peft_type not in PEFT_WRITERS:
        writable = sorted(m.id for m in REGISTRY.values() if m.peft_type in PEFT_WRITERS)
        raise RosafxError(f"format='peft' writes one method of {writable} per directory; this model "
                          f"uses {methods}. Save it with format='rosafx'.")
    config, tensors = PEFT_WRITERS[peft_type](adapted, plan.to_dict()["sites"])
    config.update({"task_type": None, "base_model_name_or_path": None, "revision": None,
                   "inference_mode": True, "modules_to_save": plan.full or None})
    for path in plan.full:
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


def check_all_used(config: dict, tensors: dict, installs: dict, planned: dict, sites: list, tensors_path,
                   used_keys: set[str] = frozenset()) -> None:
    """PEFT loads what its config targets; rosafx must neither drop a tensor silently (a
    module this model lacks, or one ``target_modules`` does not select) nor leave a
    targeted site without its weights. ``planned``: site path -> config dict."""
    used = {id(v) for v in installs.values()}
    unused = sorted(k for k, v in tensors.items() if id(v) not in used and k not in used_keys)
    if unused:
        shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
        raise RosafxError(f"{tensors_path} has tensors for modules this model lacks or rosafx cannot load: {shown}. "
                          "Use the adapter with the model it was trained for.")
    targets = config.get("target_modules")
    keys = _target_keys(config)
    selected = {s.path for s in sites if best_match(keys, s.path) is not None}
    adapted = {s.path for s in sites if s.path in planned}
    outside = sorted(adapted - selected)
    if outside:
        raise RosafxError(f"{tensors_path} has weights for {outside[:4]}, which target_modules {targets!r} does not "
                          "select (HF PEFT would ignore them): the adapter config and tensors disagree.")
    missing = sorted(selected - adapted)
    if missing:
        raise RosafxError(f"target_modules {targets!r} selects {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                          f"but {tensors_path} has no weights for them: the adapter is incomplete or for another "
                          "model.")


def _target_keys(config: dict) -> list[tuple[Key, bool]]:
    """PEFT's rule as matcher keys: a string target_modules is a regex that must fully
    match the path; a list entry matches the path or a dot-suffix of it."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return [(Key(Kind.REGEX, targets), True)]
    if not targets and not config.get("target_parameters"):
        raise RosafxError("HF PEFT adapter has no 'target_modules'.")
    if targets is None:
        return []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise RosafxError(f"HF PEFT 'target_modules' must be a regex string or a list of module names, "
                          f"got {targets!r}.")
    return [(Key(Kind.SUFFIX, t), True) for t in targets]


def _lora_from_peft(config: dict, tensors: dict, site_paths: list[str]) -> tuple[dict, dict]:
    alphas = config.get("alpha_pattern") or {}  # ranks come from the tensors' shapes
    if not isinstance(alphas, dict):
        raise RosafxError(f"HF PEFT adapter field 'alpha_pattern' must be an object, got {alphas!r}.")
    planned, installs = {}, {}
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
        planned[path] = {"method": "lora", "rank": rank, "alpha": alpha,  # types: Config.from_dict
                         "dropout": config.get("lora_dropout", 0.0), "rslora": config.get("use_rslora", False)}
        installs[adapter_tensor_name(path, "lora_A")] = tensors[a_key]
        installs[adapter_tensor_name(path, "lora_B")] = tensors[b_key]
    return planned, installs


def _pattern_value(pattern: dict, path: str, default):
    """PEFT's rank/alpha patterns: the strongest key that selects ``path`` (rosafx/graph/rules.py)."""
    found = best_match([(parse_key(k), v) for k, v in pattern.items()], path)
    return found[1] if found is not None else default


def _vera_from_peft(config: dict, tensors: dict, site_paths: list[str]) -> tuple[dict, dict]:
    """Without a saved pair (save_projection=False) the pair is drawn again from the seed,
    as PEFT itself does."""
    planned, installs = {}, {}
    for path in site_paths:
        d_key, b_key = f"{PREFIX}{path}.vera_lambda_d", f"{PREFIX}{path}.vera_lambda_b"
        if d_key not in tensors:
            continue
        if b_key not in tensors:
            raise RosafxError(f"HF PEFT adapter has {d_key} but no {b_key}: the file is incomplete.")
        planned[path] = {"method": "vera", "rank": int(tensors[d_key].shape[0]),
                         "d_initial": config.get("d_initial", 0.1), "seed": config.get("projection_prng_key", 0),
                         "dropout": config.get("vera_dropout", 0.0)}
        installs[adapter_tensor_name(path, "lambda_d")] = tensors[d_key]
        installs[adapter_tensor_name(path, "lambda_b")] = tensors[b_key]
    if planned and "base_model.vera_A" in tensors:
        installs[f"{SHARED}.vera_A"] = tensors["base_model.vera_A"]
        installs[f"{SHARED}.vera_B"] = tensors["base_model.vera_B"]
    return planned, installs


PEFT_READERS: dict[str, Callable[[dict, dict, list[str]], tuple[dict, dict]]] = {
    "LORA": _lora_from_peft,
    "VERA": _vera_from_peft,
}


def load_peft(model: nn.Module, directory, *, example_inputs=None, quantize=None) -> fx.GraphModule:
    """``quantize``: the base's quantization (a Quantization, or None): PEFT's files do not
    record it, so a QLoRA adapter is loaded onto a quantized base by saying so."""
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
    captured = capture_sites(model, example_inputs)
    sites = captured.sites
    site_paths = [s.path for s in sites if s.expert is None]
    try:
        planned, installs = PEFT_READERS[peft_type](config, tensors, site_paths)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RosafxError(f"{directory / CONFIG_NAME} has a field of the wrong type ({exc}); "
                          "it is not a valid HF PEFT adapter config.") from exc
    expert_keys: set[str] = set()
    if config.get("target_parameters"):
        if peft_type != "LORA":
            raise RosafxError(f"HF PEFT field 'target_parameters' is read for LORA adapters only, not {peft_type}.")
        expert_sites = [s for s in sites if s.expert is not None]
        expert_planned, expert_installs = experts_from_peft(config, tensors, captured.graph, expert_sites)
        planned.update(expert_planned)
        installs.update(expert_installs)
        owners = {s.weight_name.rpartition(".")[0] for s in expert_sites if s.path in expert_planned}
        expert_keys = {k for k in tensors if any(k.startswith(f"{PREFIX}{o}.") for o in owners)
                       and k.endswith((".lora_A.weight", ".lora_B.weight"))}
    if not planned:
        raise RosafxError(f"No tensor in {tensors_path} names a linear site of this model.")
    modules_to_save = config.get("modules_to_save") or []
    if not isinstance(modules_to_save, list) or not all(isinstance(p, str) for p in modules_to_save):
        raise RosafxError(f"HF PEFT adapter field 'modules_to_save' must be a list of module names, "
                          f"got {modules_to_save!r}.")
    for path in modules_to_save:
        prefix = f"{PREFIX}{path}."
        installs.update({f"full.{path}.{k[len(prefix):]}": v for k, v in tensors.items() if k.startswith(prefix)})
    check_all_used(config, tensors, installs, planned, [s for s in sites if s.expert is None], tensors_path,
                   expert_keys)
    adapted = apply(captured, Plan.from_dict({"sites": planned, "full": modules_to_save}), quantize, bank=False)
    install_tensors(adapted, installs)
    return bank_whole(adapted)  # as transform returns it (stacked after the values are in)
