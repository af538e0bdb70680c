"""The architecture sweep of issue 12: every tiny architecture in tests/arch_zoo.py, end to end.
It lives beside the zoo it sweeps (run as a script, not collected by pytest: tests/test_architectures.py
runs a subset of the same stages).

For each: transform (LoRA r4 on every site the zoo's rule selects) -> identity against the
user's eager model (capture inputs with padding, and another batch/sequence size) -> one
training step -> merge (B perturbed) against the adapted model -> ONNX export with
onnxruntime parity -> for decoders, generation with the KV cache through the merged model.
Each stage is timed; the first failing stage is recorded with its message.

    python tests/arch_sweep.py [--only bert,falcon] [--no-onnx] [--out docs/results/architectures.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

import rosafx
from rosafx.graph.adapted_graph import adapters_of

from arch_zoo import ARCHS      # this folder: python puts a script's folder on sys.path
from models import main_output

LORA = {"method": "lora", "rank": 4, "alpha": 8}


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def out(module, inputs):
    with torch.no_grad():
        return main_output(module(**inputs)).float()


def perturb(adapted, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters_of(adapted).values():
            for name, param in adapter.named_parameters():
                if name.endswith("lora_B"):
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def sweep_one(name: str, onnx: bool) -> dict:
    row: dict = {"arch": name, "stages": {}}
    t0 = time.perf_counter()
    stage = "build"

    def mark(stage_name, **values):
        row["stages"][stage_name] = {"s": round(time.perf_counter() - mark.t, 2), **values}
        mark.t = time.perf_counter()
    mark.t = t0
    try:
        arch = ARCHS[name]()
        model, inputs, other = arch.model, arch.inputs, arch.other_inputs()
        mark("build")
        stage = "transform"
        # a head tied to the embedding is left alone, so the merged weights go back into the model
        adapted = rosafx.transform(model, {arch.targets: LORA, "lm_head": None}, example_inputs=inputs)
        mark("transform", sites=len(adapted.meta["rosafx"]["sites"]),
             expert_sites=sum(".experts." in p for p in adapted.meta["rosafx"]["sites"]),
             graphs=_graph_parts(adapted))
        stage = "identity"
        row["identity"] = max(rel_err(out(adapted, inputs), out(model, inputs)),
                              rel_err(out(adapted, other), out(model, other)))
        mark("identity", rel_err=row["identity"])
        stage = "train"
        adapted.train()
        trainable = [p for p in adapted.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=1e-2)
        loss = main_output(adapted(**inputs)).float().square().mean()
        loss.backward()
        optimizer.step()
        moved = sum(bool(p.grad is not None and p.grad.abs().sum() > 0) for p in trainable)
        adapted.eval()
        if not torch.isfinite(loss) or moved == 0:
            raise RuntimeError(f"training step: loss {float(loss)}, {moved} parameters got a gradient")
        mark("train", loss=float(loss), params_with_grad=moved, trainable=len(trainable))
        stage = "merge"
        perturb(adapted)
        merged = rosafx.merge(adapted)
        row["merge"] = max(rel_err(out(merged, inputs), out(adapted, inputs)),
                           rel_err(out(merged, other), out(adapted, other)))
        mark("merge", rel_err=row["merge"])
        if onnx and "parts" in adapted.meta["rosafx"]:
            row["onnx_note"] = "n/a: captured in parts"
        elif onnx:
            stage = "onnx"
            with tempfile.TemporaryDirectory() as tmp:
                report = rosafx.export_onnx(adapted, Path(tmp) / "m.onnx", compare_base=False, latency_repeats=0)
            row["onnx"] = report.max_rel_error
            mark("onnx", max_abs_error=report.max_abs_error, rel_error=report.max_rel_error)
        if arch.decoder:
            stage = "generate"
            row["generate"] = _generate_check(model, merged, inputs)
            mark("generate", **row["generate"])
        row["status"] = "ok"
    except Exception as exc:  # the sweep records every failure and goes on
        row["status"] = f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        row["trace"] = traceback.format_exc(limit=3)[-1500:]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _graph_parts(adapted) -> str:
    parts = adapted.meta["rosafx"].get("parts")
    return "whole" if not parts else f"{len(parts)} parts"


def _generate_check(model, merged, inputs) -> dict:
    """Greedy continuation: the merged graph (no cache, rosafx.recipes.generation.greedy) against
    the user's model carrying the merged weights, generating with its KV cache on."""
    from rosafx.recipes.generation import greedy, into_model
    ids = inputs["input_ids"]
    with_cache = into_model(model, merged)
    want = with_cache.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                               do_sample=False, use_cache=True)
    got = greedy(merged, ids, max_new_tokens=4,
                 attention_mask=torch.ones_like(ids) if "attention_mask" in inputs else None)
    return {"tokens_equal": bool(torch.equal(got, want)), "new_tokens": int(want.shape[1] - ids.shape[1])}


def table(rows: list[dict]) -> str:
    lines = ["| architecture | sites | identity rel err | train | merge rel err | ONNX rel err | generate (KV cache) | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r["stages"]
        sites = st.get("transform", {}).get("sites", "")
        experts = st.get("transform", {}).get("expert_sites", 0)
        parts = st.get("transform", {}).get("graphs", "")
        site_text = f"{sites}" + (f" ({experts} expert)" if experts else "") + (f", {parts}" if parts and parts != "whole" else "")
        gen = r.get("generate")
        gen_text = "" if gen is None else ("same tokens" if gen["tokens_equal"] else "tokens differ")
        lines.append(f"| {r['arch']} | {site_text} | {_fmt(r.get('identity'))} | "
                     f"{'ok' if 'train' in st else ''} | {_fmt(r.get('merge'))} | {r.get('onnx_note') or _fmt(r.get('onnx'))} | "
                     f"{gen_text} | "
                     f"{'ok' if r['status'] == 'ok' else r['status']} |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated architecture names")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--out", default="docs/results/architectures.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)
    import transformers
    transformers.logging.set_verbosity_error()
    names = [n for n in args.only.split(",") if n] or list(ARCHS)
    rows = []
    for name in tqdm(names, desc="architectures"):
        rows.append(sweep_one(name, onnx=not args.no_onnx))
        tqdm.write(f"{name}: {rows[-1]['status']} ({rows[-1]['seconds']} s)")
    result = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
              "cpus": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "command": " ".join(["python"] + sys.argv), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
