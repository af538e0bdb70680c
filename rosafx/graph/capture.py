"""Capture: any model -> a plain, trainable ``fx.GraphModule`` of ATen ops.

``torch.export(strict=False)`` with dynamic batch and sequence dimensions does the work.
The result is re-wrapped in a plain ``fx.GraphModule`` (``ep.module()`` refuses
``train()``/``eval()``) and its parameters are re-bound to new ``Parameter`` objects that
share storage with the user's model, so freezing or replacing them never touches it.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from rosafx.errors import RosafxError

ExampleInputs = tuple | dict
# deep-copying an exported graph's pytree specs trips a torch-internal deprecation warning
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


def hf_example_inputs(model: nn.Module, batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    """Token ids sized from the model's config (no data needed). The captured module is then
    called as ``adapted(input_ids)``; for padded batches pass example inputs that include
    ``attention_mask`` and the module takes it too."""
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters(), torch.empty(0)).device      # a model on a GPU is captured there
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen).to(device)}


def _dynamic_dims(value: Any) -> Any:
    """Batch and sequence dims are dynamic; a float tensor's last (feature) dim is not."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return None
        keep_last = value.is_floating_point() and value.dim() >= 2
        dims = range(value.dim() - 1 if keep_last else value.dim())
        return {d: Dim.AUTO for d in dims}
    if isinstance(value, (list, tuple)):
        return type(value)(_dynamic_dims(v) for v in value)
    if isinstance(value, dict):
        return {k: _dynamic_dims(v) for k, v in value.items()}
    return None


def normalize_example_inputs(model: nn.Module, example_inputs: ExampleInputs | torch.Tensor | None
                             ) -> tuple[tuple, dict]:
    if example_inputs is None:
        if is_hf_model(model):
            return (), hf_example_inputs(model)
        raise RosafxError(
            f"{type(model).__name__} is not a Hugging Face model, so rosafx cannot invent its inputs: "
            "pass example_inputs=(tensor, ...) or example_inputs={'name': tensor}.")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise RosafxError("example_inputs must be a tensor, a tuple of positional arguments or a dict "
                      f"of keyword arguments, not {type(example_inputs).__name__}.")


class _UseCacheOff:
    """HF decoders return a DynamicCache that breaks export; switch it off for the capture only.
    Every config in the module tree counts: T5's decoder stack holds its own copy."""

    def __init__(self, model: nn.Module):
        configs = [getattr(m, "config", None) for m in model.modules()]
        self.configs = list({id(c): c for c in configs if c is not None and hasattr(c, "use_cache")}.values())

    def __enter__(self):
        self.saved = [c.use_cache for c in self.configs]
        for config in self.configs:
            config.use_cache = False

    def __exit__(self, *exc):
        for config, value in zip(self.configs, self.saved):
            config.use_cache = value


def export_program(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    dynamic_shapes = dynamic_shapes_for(model, args, kwargs)
    was_training = model.training
    try:
        with _UseCacheOff(model), torch.no_grad():
            return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except RosafxError:
        raise
    except Exception as exc:  # torch.export raises many types; the user needs one message
        raise RosafxError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}\n"
            "Check that example_inputs match the model's forward(); set ROSAFX_DEBUG=1 for the trace.") from exc
    finally:
        model.train(was_training)


def dynamic_shapes_for(model: nn.Module, args: tuple, kwargs: dict):
    """torch.export's dynamic_shapes for these inputs: with keyword inputs, one spec per
    forward() parameter name; otherwise one per positional argument."""
    if kwargs:
        return {**_signature_names(model, args), **_dynamic_dims(kwargs)}
    return tuple(_dynamic_dims(a) for a in args)


def _signature_names(model: nn.Module, args: tuple) -> dict:
    import inspect
    names = list(inspect.signature(model.forward).parameters)
    return {names[i]: _dynamic_dims(a) for i, a in enumerate(args)}


def _rebind_parameters(gm: fx.GraphModule) -> None:
    """New Parameter objects (same storage, ties kept) and cloned buffers: the user's model
    is never frozen, unfrozen or mutated through the captured graph."""
    fresh: dict[int, nn.Parameter] = {}
    for module in gm.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in fresh:
                fresh[id(param)] = nn.Parameter(param.detach(), requires_grad=False)
            module._parameters[name] = fresh[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.clone()


def capture(model: nn.Module | torch.export.ExportedProgram | fx.GraphModule,
            example_inputs: ExampleInputs | None = None) -> tuple[fx.GraphModule, tuple, dict]:
    """Return (graph module, example args, example kwargs). The graph module is plain fx."""
    if isinstance(model, torch.export.ExportedProgram):
        exported = model
        args, kwargs = _example_inputs_of_program(model, example_inputs)
    else:
        if not isinstance(model, nn.Module):
            raise RosafxError(f"rosafx adapts torch.nn.Module models, got {type(model).__name__}.")
        args, kwargs = normalize_example_inputs(model, example_inputs)
        exported = export_program(model, args, kwargs)
    unlifted = exported.module()
    gm = fx.GraphModule(unlifted, copy.deepcopy(unlifted.graph), class_name="RosafxGraphModule")
    _rebind_parameters(gm)
    gm.train(model.training if isinstance(model, nn.Module) else False)
    return gm, args, kwargs


def _example_inputs_of_program(program: torch.export.ExportedProgram, example_inputs) -> tuple[tuple, dict]:
    if example_inputs is not None:
        if isinstance(example_inputs, dict):
            return (), dict(example_inputs)
        if isinstance(example_inputs, torch.Tensor):
            return (example_inputs,), {}
        return tuple(example_inputs), {}
    stored = getattr(program, "example_inputs", None)
    if stored is None:
        raise RosafxError("This exported program carries no example inputs: pass example_inputs=.")
    args, kwargs = stored
    return tuple(args), dict(kwargs)
