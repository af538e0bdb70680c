"""Export: the (merged) plain graph -> ONNX, verified with onnxruntime against torch.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) with dynamic batch and
sequence axes; the legacy exporter fails on exported GraphModules. The file is written
under a temporary name and renamed only after onnxruntime agrees with torch.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from rosafx.graph.adapted_graph import is_adapted, record
from rosafx.io.atomic import temp_file_beside
from rosafx.graph.capture import dynamic_shapes_for, normalize_example_inputs
from rosafx.errors import RosafxError

from rosafx.passes.decompose import decompose_for_onnx
from rosafx.passes.export_quantized import QuantizedExport, quantize_export
from rosafx.passes.onnx_weights import DEFAULT_GROUP_SIZE, check_scheme
from rosafx.passes.merge import merge_adapters
from rosafx.passes.onnx_latency import LatencyComparison, compare_latency, op_histogram, time_one_session

MATMUL_OPS = ("MatMul", "Gemm")
# the exporter logs a warning per missing torchvision op on every export; they are noise here
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


@dataclass
class ExportReport:
    path: str
    max_abs_error: float          # onnxruntime vs torch on the example inputs
    max_rel_error: float
    tolerance: float
    matmul_nodes: int             # MatMul + Gemm nodes in the exported graph
    latency_ms: float | None      # onnxruntime median
    base_matmul_nodes: int | None = None
    base_latency_ms: float | None = None
    latency: LatencyComparison | None = None   # medians, spreads, same-graph verdict (see onnx_latency.py)
    weights: QuantizedExport | None = None     # --weights int4|int8: the file written is the quantized one

    @property
    def latency_ratio(self) -> float | None:
        """Median of the per-round merged / base ratios (None without a base comparison)."""
        return self.latency.ratio[1] if self.latency is not None else None

    @property
    def same_graph_as_base(self) -> bool | None:
        return self.latency.same_graph if self.latency is not None else None

    def to_dict(self) -> dict:
        return {**asdict(self), "latency_ratio": self.latency_ratio, "same_graph_as_base": self.same_graph_as_base,
                "weights": self.weights.to_dict() if self.weights is not None else None}

    def __str__(self) -> str:
        lines = [f"ONNX written to {self.path}",
                 f"  parity vs torch: max abs error {self.max_abs_error:.2e} (rel {self.max_rel_error:.2e}, "
                 f"tolerance {self.tolerance:.0e})",
                 f"  MatMul/Gemm nodes: {self.matmul_nodes}"
                 + (f" (base model: {self.base_matmul_nodes})" if self.base_matmul_nodes is not None else "")]
        if self.latency is not None:
            lines.append(self.latency.describe())
        elif self.latency_ms is not None:
            lines.append(f"  onnxruntime latency: median {self.latency_ms:.2f} ms")
        if self.weights is not None:
            lines.append(self.weights.describe())
        return "\n".join(lines)


def _is_adapted(model) -> bool:
    return isinstance(model, fx.GraphModule) and is_adapted(model)


def _example(model, example_inputs) -> tuple[tuple, dict]:
    if example_inputs is None and _is_adapted(model):
        return record(model)["example_inputs"]
    return normalize_example_inputs(model, example_inputs)


def _to_onnx(model: nn.Module, args: tuple, kwargs: dict, path: Path) -> None:
    model.eval()
    if isinstance(model, fx.GraphModule):
        model = decompose_for_onnx(model)  # ops without an ONNX translation (grouped MoE matmuls)
    try:
        with torch.no_grad():
            program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, verbose=False,
                                        dynamic_shapes=dynamic_shapes_for(model, args, kwargs))
        program.save(str(path), external_data=False)
    except Exception as exc:
        raise RosafxError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                          "(set ROSAFX_DEBUG=1 for the trace).") from exc


def _session(path: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(session, args, kwargs) -> dict:
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(leaves):
        raise RosafxError(f"The ONNX graph takes {len(names)} inputs but the example has {len(leaves)} tensors.")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, leaves)}


def _torch_outputs(model, args, kwargs) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*args, **kwargs)
    return [t.detach().float().cpu().numpy() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _check_finite(want: list[np.ndarray], got: list) -> None:
    """A NaN compares as no error at all (max |nan - nan| is nan, and nan > tolerance is
    false): non-finite outputs fail the parity check before any difference is taken."""
    if not all(np.isfinite(w).all() for w in want):
        raise RosafxError("The model's torch output on the example inputs holds NaN or inf: its weights (an adapter "
                          "or a module trained in full, such as the task head) are not finite. The file was not "
                          "written; export a run or adapter whose training did not diverge.")
    if not all(np.isfinite(np.asarray(g, dtype=np.float64)).all() for g in got):
        raise RosafxError("onnxruntime's output on the example inputs holds NaN or inf where torch's is finite; "
                          "the file was not written.")


def count_matmuls(path) -> int:
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    count = sum(n.op_type in MATMUL_OPS for n in graph.node)
    for function in onnx.load(str(path), load_external_data=False).functions:
        count += sum(n.op_type in MATMUL_OPS for n in function.node)
    return count


def export_onnx(model: nn.Module, path, *, example_inputs=None, merge: bool = True, tolerance: float = 1e-4,
                compare_base: bool = True, latency_repeats: int = 100, weights: str | None = None,
                group_size: int = DEFAULT_GROUP_SIZE, quant_tolerance: float | None = None) -> ExportReport:
    """``weights="int4"|"int8"``: the merged weights quantized again (every linear layer a
    MatMulNBits on blocks of ``group_size``), checked and measured against the fp32 export
    (passes/export_quantized.py); ``quant_tolerance`` overrides the scheme's output tolerance."""
    path = Path(path)
    check_scheme(weights, group_size, merge=merge)  # before the slow work
    args, kwargs = _example(model, example_inputs)
    adapted = _is_adapted(model)
    if adapted and merge:
        plain = merge_adapters(model)
    elif adapted:
        raise RosafxError("Only merged graphs export to ONNX (adapter ops have no ONNX form): use merge=True.")
    else:
        plain = model
    was_training = plain.training
    plain.eval()
    tmp = temp_file_beside(path)  # hidden, cleaned by the next export to path if this one is killed
    quantized = tmp.with_name(f"{tmp.stem}.{weights}{tmp.suffix}") if weights else None  # the same hidden prefix
    try:
        _to_onnx(plain, args, kwargs, tmp)
        session = _session(tmp)
        feed = _feed(session, args, kwargs)
        got = session.run(None, feed)
        want = _torch_outputs(plain, args, kwargs)
        if len(got) != len(want):
            raise RosafxError(f"onnxruntime returned {len(got)} outputs, torch {len(want)}.")
        _check_finite(want, got)
        abs_err = max(float(np.max(np.abs(g.astype(np.float32) - w))) if w.size else 0.0 for g, w in zip(got, want))
        scale = max(float(np.max(np.abs(w))) if w.size else 0.0 for w in want) or 1.0
        if abs_err > tolerance * max(1.0, scale):
            raise RosafxError(f"ONNX output differs from torch by {abs_err:.3e} (tolerance {tolerance:.0e} "
                              f"relative to output scale {scale:.3g}); the file was not written.")
        report = ExportReport(str(path), abs_err, abs_err / scale, tolerance, count_matmuls(tmp), None)
        if adapted and compare_base:
            _compare_with_base(model, args, kwargs, tmp, session, feed, report, latency_repeats)
        elif latency_repeats:
            report.latency_ms = time_one_session(session, feed, latency_repeats)[1]
        if weights is not None:
            report.weights = quantize_export(tmp, quantized, weights, group_size, open_session=_session, feed=feed,
                                             want=want, fp32_session=session, fp32_tolerance=tolerance,
                                             tolerance=quant_tolerance, latency_repeats=latency_repeats)
            os.replace(quantized, tmp)
        os.replace(tmp, path)
        return report
    finally:
        plain.train(was_training)
        for leftover in (tmp, quantized):
            if leftover is not None and leftover.exists():
                leftover.unlink()


def _compare_with_base(adapted, args, kwargs, merged_path: Path, session, feed, report: ExportReport,
                       runs: int) -> None:
    """Export the base model (the same graph with the original weights), compare op
    histograms, and time both interleaved (passes/onnx_latency.py)."""
    base = merge_adapters(adapted, original_weights=True)
    with tempfile.TemporaryDirectory() as tmpdir:
        base_path = Path(tmpdir) / "base.onnx"
        _to_onnx(base, args, kwargs, base_path)
        report.base_matmul_nodes = count_matmuls(base_path)
        if runs:
            same = op_histogram(base_path) == op_histogram(merged_path)
            report.latency = compare_latency(session, _session(base_path), feed, runs, same)
            report.latency_ms, report.base_latency_ms = report.latency.ms[1], report.latency.base_ms[1]
