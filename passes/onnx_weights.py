"""Weight quantization of an exported fp32 ONNX: every linear layer -> ``MatMulNBits``.

The export writes and verifies the fp32 file first; this pass reads it, and

1. rewrites each ``Gemm`` on a constant weight (the exporter's form for a linear layer on a
   2-D input, such as BERT's pooler and classifier) as ``MatMul`` + ``Add``, since
   onnxruntime's quantizer rewrites only ``MatMul`` nodes whose B is an initializer:
       Gemm(A, B, C; alpha, beta, transB) -> MatMul(A, alpha·Bᵀ) + beta·C
2. runs onnxruntime's own quantizer (``MatMulNBitsQuantizer``, round to nearest,
   asymmetric blocks of ``group_size`` weights along K with a scale and a zero point each),
   4 or 8 bits. int8 is the same operator with ``bits=8``: onnxruntime 1.32's CPU provider
   runs it (tests/test_onnx_weights.py), and like int4 it is weight-only (activations stay
   fp32, so the checks below hold exactly); dynamic int8 (MatMulInteger) would quantize the
   activations too, per batch, and need a second checking scheme.
3. reads every stored block back (``dequantize``, onnxruntime's documented layout) to
   measure the added weight error, and builds the *reference graph*: the quantized graph with
   each MatMulNBits replaced by a MatMul on its dequantized weight, which the export runs
   beside the quantized file to check that onnxruntime computes x·deq(W) + b.

Layout of MatMulNBits (onnxruntime docs/ContribOperators.md): B is uint8 [N, n_blocks,
block_size·bits/8], values packed low bits first; scales [N·n_blocks] (or [N, n_blocks]);
zero_points uint8 [N, ceil(n_blocks·bits/8)] packed the same way, absent = 2^(bits-1);
W[n, k] = (q[n, k] - zp[n, k // block_size]) · scale[n, k // block_size].
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from rosafx.errors import RosafxError

SCHEMES = {"int4": 4, "int8": 8}   # --weights scheme -> MatMulNBits bits
DEFAULT_GROUP_SIZE = 32            # weights per block: the smallest block onnxruntime's CPU kernels favour
NBITS_DOMAIN = "com.microsoft"
# Each dequantized weight lies within half a quantization step of the fp32 weight (round to
# nearest); a little more is float rounding of the scale, not a broken file.
STEP_SLACK = 0.501


def check_scheme(weights, group_size: int = DEFAULT_GROUP_SIZE, *, merge: bool = True) -> int | None:
    """The bits of ``weights`` (None: no quantization), or a one-line RosafxError."""
    if weights is None:
        return None
    if weights not in SCHEMES:
        raise RosafxError(f"Unknown weights scheme {weights!r}: choose one of {', '.join(SCHEMES)}.")
    if not merge:
        raise RosafxError(f"--weights {weights} quantizes the merged weights: it needs --merge.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16 \
            or group_size & (group_size - 1):
        raise RosafxError(f"--group-size must be a power of two, 16 or more (MatMulNBits' block size); "
                          f"got {group_size!r}.")
    return SCHEMES[weights]


@dataclass
class QuantizedWeights:
    """What quantizing one file did (the export adds its parity and latency figures)."""
    linears: int                  # MatMulNBits nodes written
    fp32_linears_left: int        # MatMul/Gemm nodes still reading a constant weight (must be 0)
    gemms_rewritten: int          # Gemm -> MatMul + Add before quantizing
    weight_rel_error: float       # ||deq(W) - W|| / ||W|| over all quantized weights together
    weight_rel_error_max: float   # the same, worst layer
    step_ratio_max: float         # max |deq(W) - W| / quantization step (<= 0.5 for round to nearest)


def _initializers(graph) -> dict:
    return {i.name: i for i in graph.initializer}


def _constant(name: str, inits: dict):
    from onnx import numpy_helper
    return numpy_helper.to_array(inits[name]) if name in inits else None


def gemm_as_matmul(model) -> int:
    """Gemm(A, B[, C]) with a constant B and transA=0 -> MatMul(A, alpha·op(B)) [+ Add(beta·C)]. In place."""
    import onnx
    from onnx import helper, numpy_helper
    graph, inits = model.graph, _initializers(model.graph)
    new_nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = _constant(node.input[1], inits) if node.op_type == "Gemm" else None
        if weight is None or attrs.get("transA", 0):
            new_nodes.append(node)
            continue
        weight = weight.T if attrs.get("transB", 0) else weight
        weight = (np.float32(attrs.get("alpha", 1.0)) * weight).astype(weight.dtype)
        b_name = f"{node.input[1]}_as_matmul_{rewritten}"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), b_name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], b_name], [product], name=f"{node.name}_matmul"))
        if has_bias:
            beta, bias_name = attrs.get("beta", 1.0), node.input[2]
            if beta != 1.0:
                bias = _constant(bias_name, inits)
                if bias is None:
                    raise RosafxError(f"Gemm {node.name!r} scales a bias that is not a constant; cannot rewrite it.")
                bias_name = f"{bias_name}_beta_{rewritten}"
                graph.initializer.append(numpy_helper.from_array((np.float32(beta) * bias).astype(bias.dtype),
                                                                 bias_name))
            new_nodes.append(helper.make_node("Add", [product, bias_name], [node.output[0]], name=f"{node.name}_bias"))
        rewritten += 1
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    onnx.checker.check_model(model)
    return rewritten


def weight_fed_linears(model) -> list[tuple[int, ...]]:
    """The weight shapes of MatMul/Gemm nodes whose B is a constant of 2 or more dimensions
    (an initializer), main graph and functions: linear layers left in fp32."""
    inits = _initializers(model.graph)
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return [tuple(inits[n.input[1]].dims) for n in nodes if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
            and n.input[1] in inits and len(inits[n.input[1]].dims) >= 2]


def nbits_nodes(model) -> list:
    return [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.domain == NBITS_DOMAIN]


def dequantize(node, inits: dict) -> np.ndarray:
    """The float64 weight [K, N] (x·W) a MatMulNBits node stores (layout: this module's docstring)."""
    from onnx import helper
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    blocks = -(-k // block)
    packed = _constant(node.input[1], inits).reshape(n, -1)
    q = _unpack(packed, bits)[:, :blocks * block].astype(np.float64)
    scales = _constant(node.input[2], inits).astype(np.float64).reshape(n, blocks)
    if len(node.input) > 3 and node.input[3]:
        zero = _unpack(_constant(node.input[3], inits).reshape(n, -1), bits)[:, :blocks].astype(np.float64)
    else:
        zero = np.full((n, blocks), 2.0 ** (bits - 1))
    w = (q.reshape(n, blocks, block) - zero[:, :, None]) * scales[:, :, None]
    return w.reshape(n, blocks * block)[:, :k].T


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 rows -> one value per ``bits``, low bits first."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)


def quantize_file(src, dst, scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedWeights:
    """Read the fp32 ONNX ``src``, write its weight-quantized twin to ``dst``."""
    import onnx
    bits = check_scheme(scheme, group_size)
    model = onnx.load(str(src))
    rewritten = gemm_as_matmul(model)
    inits = _initializers(model.graph)   # the fp32 weights, by name, before the quantizer replaces them
    originals = {n.input[1]: _constant(n.input[1], inits) for n in model.graph.node
                 if n.op_type == "MatMul" and n.input[1] in inits}
    quantized = _run_quantizer(model, bits, group_size)
    inits = _initializers(quantized.graph)
    errors, sq_err, sq_ref, step_ratio = [], 0.0, 0.0, 0.0
    for node in nbits_nodes(quantized):
        original = originals.get(node.input[1].removesuffix(f"_Q{bits}"))
        if original is None:
            raise RosafxError(f"MatMulNBits node {node.name!r} has no fp32 MatMul it came from; not written.")
        original = original.astype(np.float64).reshape(dequantize(node, inits).shape)
        diff = dequantize(node, inits) - original
        sq_err, sq_ref = sq_err + float((diff ** 2).sum()), sq_ref + float((original ** 2).sum())
        errors.append(float(np.linalg.norm(diff) / (np.linalg.norm(original) or 1.0)))
        step_ratio = max(step_ratio, _step_ratio(original, diff, bits, group_size))
    left = weight_fed_linears(quantized)
    report = QuantizedWeights(len(errors), len(left), rewritten,
                              (sq_err / sq_ref) ** 0.5 if sq_ref else 0.0, max(errors, default=0.0), step_ratio)
    if report.linears == 0:
        raise RosafxError("The model has no linear layer on a constant weight: nothing to quantize.")
    if report.fp32_linears_left:
        raise RosafxError(f"{len(left)} linear layers (weights {', '.join(map(str, sorted(set(left))))}) were left "
                          f"in fp32 beside {report.linears} quantized: MatMulNBits takes a 2-D weight read by "
                          "MatMul (3-D expert weights are not supported); the file was not written.")
    if step_ratio > STEP_SLACK:
        raise RosafxError(f"A quantized weight lies {step_ratio:.2f} quantization steps from the merged weight "
                          f"(round to nearest: at most 0.5); the file was not written.")
    onnx.save(quantized, str(dst))
    return report


def _step_ratio(original: np.ndarray, diff: np.ndarray, bits: int, block: int) -> float:
    """max |diff| / step over the blocks of W [K, N]: step = range of the block (0 included) / (2^bits - 1)."""
    k, n = original.shape
    pad = -k % block
    w = np.pad(original, ((0, pad), (0, 0))).reshape(-1, block, n)
    d = np.pad(diff, ((0, pad), (0, 0))).reshape(-1, block, n)
    step = (np.maximum(w.max(axis=1), 0) - np.minimum(w.min(axis=1), 0)) / (2 ** bits - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(step > 0, np.abs(d).max(axis=1) / step, np.where(np.abs(d).max(axis=1) > 0, np.inf, 0))
    return float(ratio.max()) if ratio.size else 0.0


def _quantizer_class():
    """onnxruntime's quantizer module calls ``logging.basicConfig(level=INFO)`` when imported,
    which would print every INFO line of the user's process from then on: undone here."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        import onnxruntime
        raise RosafxError(f"--weights needs onnxruntime's MatMulNBits quantizer, which onnxruntime "
                          f"{onnxruntime.__version__} lacks ({exc}); checked with 1.32: "
                          "pip install -U onnxruntime.") from exc
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    return MatMulNBitsQuantizer


def _run_quantizer(model, bits: int, group_size: int):
    quantizer_class = _quantizer_class()
    # a line per node skipped (activation x activation) and per initializer deduplicated: noise here
    noisy = [logging.getLogger(name) for name in ("onnxruntime.quantization", "onnx_ir")]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    try:
        quantizer = quantizer_class(model, bits=bits, block_size=group_size, is_symmetric=False,
                                    op_types_to_quantize=("MatMul",))
        quantizer.process()
    finally:
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)
    return quantizer.model.model


def reference_graph(quantized):
    """The quantized model with each MatMulNBits replaced by a fp32 MatMul on deq(W): what
    the quantized file must compute (the export compares the two in onnxruntime)."""
    import onnx
    from onnx import helper, numpy_helper
    reference = onnx.ModelProto()
    reference.CopyFrom(quantized)
    inits, nodes = _initializers(reference.graph), []
    for node in reference.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == NBITS_DOMAIN:
            name = f"{node.input[1]}_dequantized"
            reference.graph.initializer.append(numpy_helper.from_array(dequantize(node, inits).astype(np.float32),
                                                                       name))
            inputs = [node.input[0], name]
            if len(node.input) > 5 and node.input[5]:   # MatMulNBits' optional bias
                nodes.append(helper.make_node("MatMul", inputs, [f"{node.output[0]}_nobias"]))
                nodes.append(helper.make_node("Add", [f"{node.output[0]}_nobias", node.input[5]], list(node.output)))
            else:
                nodes.append(helper.make_node("MatMul", inputs, list(node.output), name=f"{node.name}_reference"))
        else:
            nodes.append(node)
    reference.graph.ClearField("node")
    reference.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [i for i in reference.graph.initializer if i.name in used]   # the packed blocks go
    reference.graph.ClearField("initializer")
    reference.graph.initializer.extend(kept)
    return reference
