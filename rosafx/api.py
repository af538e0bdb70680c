"""The public API, thin over the passes."""
from __future__ import annotations

from torch import fx, nn

from rosafx.graph.adapted_graph import adapters_of, is_adapted
from rosafx.errors import RosafxError
from rosafx.methods import FULL, REGISTRY, get_method
from rosafx.pipeline.adapted_model import adapted_model
from rosafx.pipeline.transform import transform


def merge(adapted: fx.GraphModule) -> fx.GraphModule:
    """A plain graph: every adapter folded into its weight (fp32 accumulation, finite check)."""
    return adapted_model(adapted, "merge").merged()


def methods() -> list[str]:
    """The registered method ids (plus ``full``, which trains a whole module as is)."""
    return sorted(REGISTRY) + [FULL]


def export_onnx(model: nn.Module, path, *, example_inputs=None, merge: bool = True, **options):
    """Export to ONNX (dynamo exporter, dynamic batch/sequence axes), verify with onnxruntime
    against torch, and return an ``ExportReport`` (max error, latency against the base).
    ``weights="int4"|"int8"`` (with ``group_size``, default 32) quantizes the merged weights
    again: every linear layer an onnxruntime MatMulNBits; the report adds the error this adds,
    file size and latency against the fp32 export."""
    from rosafx.passes.export import export_onnx as _export

    if is_adapted(model) and not (owner := adapted_model(model, "export_onnx")).whole:
        raise RosafxError("This model was captured in parts (the whole model does not export: "
                          f"{owner.why_in_parts}); ONNX needs one graph. Merge it and export the parts, "
                          "or make the model traceable (for Mixtral: set_experts_implementation('batched_mm')).")
    return _export(model, path, example_inputs=example_inputs, merge=merge, **options)


def save(adapted: fx.GraphModule, directory, *, format: str = "rosafx") -> None:
    """Write the adapter (safetensors + JSON). ``format="peft"`` writes an HF PEFT directory."""
    from rosafx.pipeline.serialize import save as _save
    adapted_model(adapted, "save")
    _save(adapted, directory, format=format)


def load(model: nn.Module, directory, *, example_inputs=None, quantize=None) -> fx.GraphModule:
    """Rebuild the adapted model from ``model`` and a saved adapter directory (rosafx or HF PEFT).
    ``quantize``: the base's quantization (default: as the adapter was saved; name it to load
    an HF PEFT QLoRA adapter onto a quantized base)."""
    from rosafx.pipeline.serialize import load as _load
    return _load(model, directory, example_inputs=example_inputs, quantize=quantize)


def calibrate(adapted: fx.GraphModule, batches, loss_fn, **options) -> fx.GraphModule:
    """Run the data-dependent preparation of every site that needs it (lora-ga, rosa-robust masks)."""
    from rosafx.methods.calibration import calibrate as _calibrate
    adapted_model(adapted, "calibrate", whole_graph=True)
    return _calibrate(adapted, batches, loss_fn, **options)


def lower(adapted: fx.GraphModule, backend: str = "auto") -> fx.GraphModule:
    """Swap the adapter ops' implementation: ``auto`` (Triton on CUDA), ``triton`` or ``torch``."""
    from rosafx.passes.lower import lower as _lower
    adapted_model(adapted, "lower", whole_graph=True)
    return _lower(adapted, backend=backend)


def to_device(adapted: fx.GraphModule, device) -> fx.GraphModule:
    """Move a captured graph, its weights and adapters to ``device`` (the device the capture
    baked into the graph is rewritten too). In place; build optimizers afterwards."""
    from rosafx.passes.to_device import to_device as _to_device
    adapted_model(adapted, "to_device", whole_graph=True)
    return _to_device(adapted, device)


def fuse_siblings(adapted: fx.GraphModule) -> fx.GraphModule:
    """Adapter sites that read the same input (q, k, v; gate, up) share their down-projection:
    one matmul over the stacked A's, forward and backward. In place (optimizers keep their
    tensors); parameters, merge, save (both formats) and calibrate are unchanged."""
    from rosafx.passes.fuse_siblings import fuse_siblings as _fuse
    adapted_model(adapted, "fuse_siblings")
    return _fuse(adapted)


def bank(adapted: fx.GraphModule) -> fx.GraphModule:
    """Train the small adapter tensors (lora's A and B) as a few stacked Parameters, so an
    optimizer's per-tensor loop runs over three tensors instead of two per site (passes/bank.py;
    the graph, merge, save and export are unchanged). What ``transform`` and ``load`` return by
    default; for a model built with ``bank=False`` or unbanked. In place; build the optimizer
    afterwards. ``unbank`` undoes it."""
    from rosafx.passes.bank import bank_adapters
    adapted_model(adapted, "bank", whole_graph=True)
    return bank_adapters(adapted)


def unbank(adapted: fx.GraphModule) -> fx.GraphModule:
    """Each banked adapter tensor a Parameter of its own again, with its trained values."""
    from rosafx.passes.bank import unbank_adapters
    return unbank_adapters(adapted)


def act(adapted: fx.GraphModule, action: str, optimizer=None) -> fx.GraphModule:
    """Run a method's action (``Method.actions``) on every site of the methods that have it,
    in method-id order. ``optimizer``: the one training these sites (an action that rewrites
    a parameter in place clears its optimizer state)."""
    adapted_model(adapted, action, whole_graph=True)
    by_method: dict[str, list] = {}
    for adapter in adapters_of(adapted).values():
        if action in get_method(adapter.config.method).actions:
            by_method.setdefault(adapter.config.method, []).append(adapter)
    if not by_method:
        having = [m.id for m in REGISTRY.values() if action in m.actions]
        raise RosafxError(f"rosafx.{action} needs {' or '.join(having) or 'no known method'} sites; "
                          "this model has none.")
    for method_id in sorted(by_method):
        get_method(method_id).actions[action](by_method[method_id], optimizer)
    return adapted


def resample(adapted: fx.GraphModule, optimizer=None) -> fx.GraphModule:
    """ROSA: fold B·A into the frozen weight and factorise again with a fresh block (the
    output is unchanged; A and B are rewritten in place and their optimizer state cleared)."""
    return act(adapted, "resample", optimizer)


__all__ = ["transform", "merge", "methods", "export_onnx", "save", "load", "calibrate", "lower", "act", "resample",
           "fuse_siblings"]
