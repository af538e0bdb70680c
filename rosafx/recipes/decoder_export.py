"""A decoder's ONNX with the KV cache: each new token is one call on one token.

The captured graph has the cache off (a cache object cannot cross the export boundary), so
the deployable graph is exported from the user's HF model carrying the merged weights
(``generation.into_model``), wrapped so that the cache crosses the boundary as flat tensors:

    inputs   input_ids                 int64 (batch, sequence)        the new tokens
             attention_mask            int64 (batch, past + sequence)  1 for every token seen so far
             position_ids              int64 (batch, sequence)        past .. past + sequence - 1
             past_key_values.{i}.key   float (batch, kv_heads, past, head_dim), i = 0 .. layers - 1
             past_key_values.{i}.value
    outputs  logits                    float (batch, sequence, vocabulary)
             present.{i}.key / .value  float (batch, kv_heads, past + sequence, head_dim)

(the names onnxruntime-genai and optimum use). One graph serves the prompt (past length 0,
every prompt token at once) and each decode step (one token, the previous call's presents
as pasts). Inside, the flat tensors become the HF cache object (``DynamicCache``) and the
model's own attention code runs: no attention is rewritten here. Exported with
``torch.onnx.export(dynamo=True)`` as every rosafx export is; the file is renamed into place
only after onnxruntime agrees with the HF model on a prompt step and a decode step.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rosafx.errors import RosafxError
from rosafx.io.atomic import temp_file_beside
from rosafx.recipes.decoder_io import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, CacheLayout, present_name
from rosafx.recipes.onnx_decoding import OnnxDecoder


class CachedDecoder(nn.Module):
    """The HF causal LM with its cache as flat tensors (past in, present out)."""

    def __init__(self, model: nn.Module, layout: CacheLayout):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layout.layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


@dataclass
class CachedExportReport:
    path: str
    layers: int
    max_abs_error: float      # onnxruntime vs the HF model, prompt step and one decode step
    tolerance: float
    weights: object = None    # passes/export_quantized.QuantizedExport when re-quantized (int4/int8)

    def __str__(self) -> str:
        text = (f"ONNX with KV cache written to {self.path} ({self.layers} layers; one call per new token)\n"
                f"  parity vs torch (prompt + one cached step): max abs error {self.max_abs_error:.2e} "
                f"(tolerance {self.tolerance:.0e})")
        return text if self.weights is None else text + "\n" + self.weights.describe()


def _example(layout: CacheLayout, vocab: int, batch=2, new=3, past=4):
    """Inputs with a non-empty past and more than one new token, so no dimension is
    specialised to 0 or 1 by the exporter."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, new), generator=g)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    positions = torch.arange(past, past + new).expand(batch, new).contiguous()
    pasts = [torch.randn(batch, layout.kv_heads, past, layout.head_dim, generator=g) * 0.1
             for _ in range(2 * layout.layers)]
    return ids, mask, positions, pasts


def export_cached_decoder(model: nn.Module, path, *, tolerance: float = 1e-4, weights: str | None = None,
                          group_size: int | None = None) -> CachedExportReport:
    """Export ``model`` (an HF causal LM, e.g. ``into_model(base, rosafx.merge(adapted))``).
    ``weights="int4"|"int8"``: the verified fp32 file's linear layers re-quantized to
    MatMulNBits and checked as ``model.onnx``'s are (passes/export_quantized.py), on the
    export's example inputs (a non-empty past and three new tokens)."""
    path = Path(path)
    model = model.eval()
    layout = CacheLayout.of(model.config)
    wrapper = CachedDecoder(model, layout).eval()
    args = _example(layout, int(model.config.get_text_config(decoder=True).vocab_size))
    batch, new, past = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past_sequence")
    shapes = ({0: batch, 1: new}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: new},
              [{0: batch, 2: past}] * (2 * layout.layers))
    tmp = temp_file_beside(path)
    try:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # the exporter's note that batch/sequence are named once across inputs: expected
                warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
                program = torch.onnx.export(
                    wrapper, args, dynamo=True, verbose=False, dynamic_shapes=shapes,
                    input_names=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *layout.names()],
                    output_names=["logits", *layout.names(name=present_name)])
            program.save(str(tmp), external_data=False)
        except Exception as exc:
            raise RosafxError(f"ONNX export of the cached decoder ({type(model).__name__}) failed: "
                              f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]} "
                              "(set ROSAFX_DEBUG=1 for the trace).") from exc
        error = _check_parity(model, tmp, layout, tolerance)
        quantized = None
        if weights is not None:
            quantized = _quantize_weights(wrapper, args, layout, tmp, weights, group_size, tolerance)
        os.replace(tmp, path)
        return CachedExportReport(str(path), layout.layers, error, tolerance, quantized)
    finally:
        if tmp.exists():
            tmp.unlink()


def _quantize_weights(wrapper: CachedDecoder, args, layout: CacheLayout, fp32_path: Path, scheme: str,
                      group_size: int | None, tolerance: float):
    """``fp32_path`` replaced by its weight-quantized twin once it passes the three checks."""
    from rosafx.passes.export_quantized import quantize_export
    from rosafx.passes.onnx_weights import DEFAULT_GROUP_SIZE
    ids, mask, positions, pasts = args
    names = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *layout.names()]
    feed = dict(zip(names, [ids.numpy().astype(np.int64), mask.numpy().astype(np.int64),
                            positions.numpy().astype(np.int64), *[p.numpy() for p in pasts]]))
    with torch.no_grad():
        want = [o.float().numpy() for o in wrapper(*args)]
    quantized = temp_file_beside(fp32_path)
    try:
        report = quantize_export(fp32_path, quantized, scheme, DEFAULT_GROUP_SIZE if group_size is None else group_size,
                                 open_session=lambda p: OnnxDecoder(p).session, feed=feed, want=want,
                                 fp32_session=None, fp32_tolerance=tolerance,   # no latency compared here
                                 tolerance=None, latency_repeats=0)
        os.replace(quantized, fp32_path)
        return report
    finally:
        if quantized.exists():
            quantized.unlink()


def _check_parity(model, onnx_path: Path, layout: CacheLayout, tolerance: float) -> float:
    """onnxruntime against the HF model's own cached forward: a 5-token prompt from an empty
    past, then one token on the presents it returned."""
    decoder = OnnxDecoder(onnx_path)
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    prompt = torch.randint(0, vocab, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = model(input_ids=prompt, use_cache=True)
        nxt = first.logits[:, -1:].argmax(-1)
        second = model(input_ids=nxt, cache=first.cache, use_cache=True)
    got_first, state = decoder.step(prompt.numpy(), decoder.empty_state(1))
    got_second, _ = decoder.step(nxt.numpy(), state)
    worst = 0.0
    for want, got in ((first.logits, got_first), (second.logits, got_second)):
        want = want.float().numpy()
        if not (np.isfinite(want).all() and np.isfinite(got).all()):
            raise RosafxError("The decoder's logits hold NaN or inf (torch or onnxruntime); the file was not written.")
        scale = max(1.0, float(np.abs(want).max()))
        error = float(np.abs(got - want).max())
        if error > tolerance * scale:
            raise RosafxError(f"The cached ONNX differs from torch by {error:.3e} (tolerance {tolerance:.0e} relative "
                              f"to logits of scale {scale:.3g}); the file was not written.")
        worst = max(worst, error)
    return worst
