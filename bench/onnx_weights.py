"""Quantized ONNX exports (issue 25): fp32 vs int8 vs int4 weights of a trained MiniLM LoRA.

The demo's recipe (rosafx/recipes/demo.py: all-MiniLM-L6-v2, LoRA on query/key/value/attention
output + the classifier trained in full, the 4,000-row SST-2 sample, a held-apart fifth),
trained with ``rosafx.fit``; then the merged model is exported with ``weights=None``, "int8"
and "int4" (``rosafx.export_onnx``, which checks each file) and every file is measured:

* size on disk;
* latency of one batch (``--batch`` rows x ``--max-length`` tokens), median of ``--repeats``
  rounds in which the sessions run one after the other in rotating order (a shared machine's
  load hits all alike), with the 25th-75th percentiles;
* accuracy on the held-apart rows and the share of predictions equal to the merged torch model's;
* the export report's added error (relative weight error, output difference on the example).

    cd bench && HF_HUB_OFFLINE=1 ../.venv/bin/python onnx_weights.py [--steps 250] [--out ../docs/results]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import rosafx
from rosafx.passes.onnx_latency import quartiles
from rosafx.recipes.data import TaskMetrics, loss_for, model_inputs
from rosafx.recipes.demo import TARGETS
from rosafx.recipes.evaluation import onnx_scores, onnx_session

from common import batches, load_classifier, record, sst2_split, write_json

SCHEMES = {"fp32": None, "int8": "int8", "int4": "int4"}


def train_demo_model(args):
    train_ex, valid_ex = sst2_split()
    model, tokenizer = load_classifier(seed=0)
    train = batches(train_ex, tokenizer, 32, args.max_length, shuffle=True)
    valid = batches(valid_ex, tokenizer, 128, args.max_length)
    example = model_inputs(valid.batch(torch.arange(2)))
    config = {"method": "lora", "rank": 8}
    adapted = rosafx.transform(model, {**{t: config for t in TARGETS}, "classifier": {"method": "full"}},
                               example_inputs=example)
    start = time.perf_counter()
    if args.steps:
        rosafx.fit(adapted, train, loss_for("classification"), steps=args.steps, lr=1e-3, warmup_ratio=0.1,
                   progress=False)
    adapted.eval()   # fit leaves the model training (dropout on)
    if args.save:
        rosafx.save(adapted, args.save)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; "
          f"{len(train_ex.labels)} train / {len(valid_ex.labels)} held-apart rows")
    return adapted, example, valid


def torch_predictions(model, valid) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(**model_inputs(b)).logits.argmax(-1) for b in valid]).numpy()


def onnx_predictions(session, valid) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    out = []
    for b in valid:
        inputs = model_inputs(b)
        out.append(session.run(None, {n: inputs[n].numpy() for n in names})[0].argmax(-1))
    return np.concatenate(out)


def time_rotating(sessions: dict, batch: dict, repeats: int) -> dict:
    """name -> (p25, median, p75) ms of one run, the sessions run in rotating order each round."""
    names = list(sessions)
    feeds = {n: {i.name: batch[i.name].numpy() for i in s.get_inputs()} for n, s in sessions.items()}
    for n in names:
        sessions[n].run(None, feeds[n])
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            sessions[n].run(None, feeds[n])
            times[n].append((time.perf_counter() - start) * 1e3)
    return {n: quartiles(t) for n, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250, help="training steps (the demo's 250; 0: untrained head)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="rows in the timed batch")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    parser.add_argument("--out", type=Path, default=Path("../docs/results"))
    parser.add_argument("--save", type=Path, help="also save the trained adapter here (rosafx.save)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    adapted, example, valid = train_demo_model(args)
    merged = rosafx.merge(adapted).eval()
    want = torch_predictions(merged, valid)
    labels = torch.cat([b["labels"] for b in valid]).numpy()
    merged_acc = float((want == labels).mean())
    evaluated = rosafx.evaluate(merged, valid, metrics=TaskMetrics("classification"), progress=False)
    if abs(merged_acc - evaluated["eval_accuracy"]) > 1e-9:
        print(f"warning: rosafx.evaluate says {evaluated['eval_accuracy']:.4f}")
    print(f"merged torch model: held-apart accuracy {merged_acc:.4f} on {len(labels)} rows")

    results, sessions = {"merged_torch": {"accuracy": merged_acc, "rows": int(len(labels))}}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, scheme in SCHEMES.items():
            path = Path(tmp) / f"{name}.onnx"
            start = time.perf_counter()
            report = rosafx.export_onnx(adapted, path, example_inputs=example, weights=scheme,
                                        group_size=args.group_size, compare_base=False, latency_repeats=20)
            print(f"--- {name} (export {time.perf_counter() - start:.0f} s)\n{report}")
            session = onnx_session(path)
            got = onnx_predictions(session, valid)
            accuracy = onnx_scores(session, valid, "classification")["eval_accuracy"]
            assert abs(accuracy - float((got == labels).mean())) < 1e-9
            results[name] = {"size_bytes": path.stat().st_size, "accuracy": accuracy,
                             "agreement_with_merged": float((got == want).mean()),
                             "report": report.to_dict()}
            sessions[name] = session
        timed = model_inputs(valid.batch(torch.arange(args.batch)))   # the first held-apart rows
        for name, q in time_rotating(sessions, timed, args.repeats).items():
            results[name]["batch_ms"] = q
    fp32 = results["fp32"]
    print(f"\n| export | file | size vs fp32 | batch of {args.batch}x{args.max_length}, median ms (p25-p75) "
          f"| vs fp32 | held-apart accuracy | agrees with merged torch | relative weight error |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| merged torch | | | | | {merged_acc:.2%} | | |")
    for name in SCHEMES:
        r = results[name]
        w = r["report"]["weights"]
        q = r["batch_ms"]
        print(f"| {name} | {r['size_bytes'] / 2**20:.1f} MiB | x{r['size_bytes'] / fp32['size_bytes']:.3f} "
              f"| {q[1]:.1f} ({q[0]:.1f}-{q[2]:.1f}) | x{q[1] / fp32['batch_ms'][1]:.2f} | {r['accuracy']:.2%} "
              f"| {r['agreement_with_merged']:.2%} | {w['weights']['weight_rel_error']:.2e} |" if w else
              f"| {name} | {r['size_bytes'] / 2**20:.1f} MiB | x1.000 | {q[1]:.1f} ({q[0]:.1f}-{q[2]:.1f}) | x1.00 "
              f"| {r['accuracy']:.2%} | {r['agreement_with_merged']:.2%} | 0 |")
    out = args.out / f"onnx_weights_steps{args.steps}.json"
    write_json(out, record(args, results, command="cd bench && HF_HUB_OFFLINE=1 ../.venv/bin/python onnx_weights.py "
                           + " ".join(argv or [])))
    print(f"written {out}")


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
