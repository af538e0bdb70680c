"""The quantized step of the export: the verified fp32 file -> its weight-quantized twin,
checked and measured before it takes the file's name.

Merging into quantized weights cannot be exact (PEFT warns on 4-bit merges), so the fp32
parity tolerance cannot apply; instead three checks, each of which a broken file fails:

* every stored weight lies within half a quantization step of the merged fp32 weight
  (round to nearest; passes/onnx_weights.py, when it quantizes);
* onnxruntime's quantized graph computes x·deq(W) + b: its outputs equal those of the
  reference graph (each MatMulNBits a fp32 MatMul on its dequantized weight) within the
  fp32 export's own tolerance;
* its outputs stay within the scheme's quantization tolerance of the merged torch model
  (``QUANT_TOLERANCE``, relative to the output scale, as the fp32 check is): the added error,
  which the report prints.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rosafx.errors import RosafxError
from rosafx.passes.onnx_latency import LatencyComparison, compare_latency
from rosafx.passes.onnx_weights import QuantizedWeights, quantize_file, reference_graph

# largest output difference from the merged torch model, relative to max(1, output scale); a
# round-to-nearest weight error of ~0.5 % (int8) or ~8 % (int4, blocks of 32) moves outputs by
# well under these (docs/quantized_onnx.md), a wrong scale or zero point by far more
QUANT_TOLERANCE = {"int8": 0.02, "int4": 0.2}


@dataclass
class QuantizedExport:
    scheme: str                   # int4 | int8
    group_size: int
    operator: str                 # what the linear layers became
    weights: QuantizedWeights     # node counts and the added weight error
    max_abs_error: float          # quantized ONNX vs the merged torch model (the added error)
    max_rel_error: float          # the same over the output scale
    tolerance: float              # QUANT_TOLERANCE[scheme] unless given
    kernel_error: float           # quantized ONNX vs its dequantized reference graph
    size_bytes: int
    fp32_size_bytes: int
    latency: LatencyComparison | None = None   # quantized vs fp32, interleaved

    @property
    def size_ratio(self) -> float:
        return self.size_bytes / self.fp32_size_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "size_ratio": self.size_ratio}

    def describe(self) -> str:
        w = self.weights
        lines = [f"  weights {self.scheme} (blocks of {self.group_size}): {w.linears} linear layers -> "
                 f"{self.operator}, {w.fp32_linears_left} left in fp32",
                 f"  added error of re-quantizing the merged weights: relative weight error {w.weight_rel_error:.2e} "
                 f"(worst layer {w.weight_rel_error_max:.2e}); output vs merged torch max abs {self.max_abs_error:.2e} "
                 f"(rel {self.max_rel_error:.2e}, tolerance {self.tolerance:.0e})",
                 f"  file size {_mb(self.size_bytes)} vs fp32 {_mb(self.fp32_size_bytes)} (x{self.size_ratio:.3f})"]
        if self.latency is not None:
            lines.append(self.latency.describe())
        return "\n".join(lines)


def _mb(size: int) -> str:
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def quantize_export(fp32_path: Path, out_tmp: Path, scheme: str, group_size: int, *, open_session, feed: dict,
                    want: list[np.ndarray], fp32_session, fp32_tolerance: float, tolerance: float | None,
                    latency_repeats: int) -> QuantizedExport:
    """Write ``out_tmp`` (quantized from the verified ``fp32_path``), check it (module docstring)
    against the merged torch model's outputs ``want`` on ``feed``, and measure it."""
    import onnx
    weights = quantize_file(fp32_path, out_tmp, scheme, group_size)
    session = open_session(out_tmp)
    got = [np.asarray(g, dtype=np.float32) for g in session.run(None, feed)]
    if not all(np.isfinite(g).all() for g in got):   # NaN compares as no error at all
        raise RosafxError(f"The {scheme} ONNX output holds NaN or inf; the file was not written.")
    scale = max(float(np.max(np.abs(w))) if w.size else 0.0 for w in want) or 1.0
    with tempfile.TemporaryDirectory() as tmpdir:
        reference_path = Path(tmpdir) / "reference.onnx"
        onnx.save(reference_graph(onnx.load(str(out_tmp))), str(reference_path))
        reference = open_session(reference_path).run(None, feed)
    kernel_error = _max_abs(got, reference)
    if kernel_error > fp32_tolerance * max(1.0, scale):
        raise RosafxError(f"onnxruntime's {scheme} graph differs from its own dequantized weights by "
                          f"{kernel_error:.3e} (tolerance {fp32_tolerance:.0e}); the file was not written.")
    tolerance = QUANT_TOLERANCE[scheme] if tolerance is None else tolerance
    abs_err = _max_abs(got, want)
    if abs_err > tolerance * max(1.0, scale):
        raise RosafxError(f"The {scheme} ONNX output differs from the merged torch model by {abs_err:.3e} "
                          f"(quantization tolerance {tolerance:.0e} relative to output scale {scale:.3g}); "
                          "the file was not written. Try --weights int8 or a smaller --group-size.")
    report = QuantizedExport(scheme, group_size, "MatMulNBits", weights, abs_err, abs_err / scale, tolerance,
                             kernel_error, out_tmp.stat().st_size, fp32_path.stat().st_size)
    if latency_repeats:
        report.latency = compare_latency(session, fp32_session, feed, latency_repeats, False, (scheme, "fp32"))
    return report


def _max_abs(got: list, want: list) -> float:
    return max((float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)))) if np.size(w) else 0.0
                for g, w in zip(got, want)), default=0.0)
