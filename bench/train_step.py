"""One training step on all-MiniLM-L6-v2: rosafx variants vs HF PEFT vs the frozen floor.

batch 32 x 64 tokens, AdamW, dropout off everywhere. The floor is the frozen base model
with backward for input gradients only (no adapter, no weight grads): no adapter method can
be cheaper. Variants (``--variants``, comma-separated):

    floor              frozen base, input gradients only
    lora, peft-lora    LoRA rank 8, alpha 16 on the 36 encoder linears (331,776 trainable)
    lora-fused         lora + passes/fuse_siblings.py (q,k,v share one x·Aᵀ)
    lora-unmerged      lora with the op's merged-weight route switched off during its steps
                       (forward and dx as x·Wᵀ + s·h·Bᵀ, dy·W + g·A): the A/B for that route
    lora-rebuilt       lora with the backward building W + s·B·A again instead of taking the
                       forward's (the A/B for ops/lowrank.py's forward_saving)
    rosa-robust        RoSA rank 4 + density 1.5625 % (331,776 trainable: LoRA r8's count),
                       random masks of the exact budget (timing does not depend on where)
    rosa-robust-1pct   RoSA rank 8 + density 1 % (437,928 trainable)
    rosa-robust-unblocked  rosa-robust with the values' SDDMM over all N rows at once (the A/B
                       for ops/sparse.py's row blocks)
    vera, peft-vera    VeRA rank 256 on query, key, value, attention.output.dense
    vera-fused         vera + fuse_siblings (q,k,v share x·A_slᵀ)

``--compile`` wraps every variant's forward in ``torch.compile`` and reports the first
(compiling) step separately from the step time.

Variants are interleaved, repeat after repeat: each figure is the median over repeats, with
the 25th–75th percentile, and each ratio is the median of the per-repeat ratios (both
variants timed within the same repeat, seconds apart), with its own 25th–75th percentile.

    python bench/train_step.py [--variants floor,lora,peft-lora] [--repeats 9] [--steps 2]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import rosafx
from common import ENCODER_LINEARS, load_encoder, trainable, write_json

VERA_SITES = r"encoder\.layer\.\d+\.attention\..*(query|key|value|dense)"
LORA = {"method": "lora", "rank": 8, "alpha": 16}
VERA = {"method": "vera", "rank": 256, "d_initial": 0.1}
ROSA_R4 = {"method": "rosa-robust", "rank": 4, "alpha": 8, "density": 0.015625}


def load_base():
    return load_encoder(dropout=False)[0]


def training_step(model, call):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        call().last_hidden_state.float().pow(2).mean().backward()
        optimizer.step()
    return step, trainable(model)


def rosafx_variant(rules, fuse=False, masks=False):
    def build(base, ids, compile_):
        adapted = rosafx.transform(base, rules)
        if masks:
            random_masks(adapted)
        if fuse:
            from rosafx.passes.fuse_siblings import fuse_siblings
            adapted = fuse_siblings(adapted)
        forward = torch.compile(adapted) if compile_ else adapted
        return training_step(adapted, lambda: forward(ids))
    return build


def patched(build, module: str, attribute: str, value):
    """``build``'s step with ``module.attribute`` replaced by ``value`` while the step runs
    (the ops read these at call time, so other variants are unaffected): an A/B of one
    code path in the same run."""
    def wrapped(base, ids, compile_):
        import importlib
        target = importlib.import_module(module)
        step, count = build(base, ids, compile_)

        def step_patched():
            original = getattr(target, attribute)
            setattr(target, attribute, value)
            try:
                step()
            finally:
                setattr(target, attribute, original)
        return step_patched, count
    return wrapped


def random_masks(adapted) -> None:
    from rosafx.methods.rosa_robust import RosaRobustAdapter, mask_from_statistic
    from rosafx.graph.adapted_graph import adapters_of
    g = torch.Generator().manual_seed(0)
    for adapter in adapters_of(adapted).values():
        if isinstance(adapter, RosaRobustAdapter):
            stat = torch.rand(adapter.out_features, adapter.in_features, generator=g)
            adapter.apply_mask(*mask_from_statistic(stat, adapter.budget))


def peft_variant(kind):
    def build(base, ids, compile_):
        from peft import LoraConfig, VeraConfig, get_peft_model
        config = LoraConfig(r=8, lora_alpha=16, target_modules=ENCODER_LINEARS) if kind == "lora" else \
            VeraConfig(r=256, target_modules=VERA_SITES, d_initial=0.1, projection_prng_key=0)
        model = get_peft_model(copy.deepcopy(base), config)
        forward = torch.compile(model) if compile_ else model
        return training_step(model, lambda: forward(input_ids=ids))
    return build


def floor_variant(base, ids, compile_):
    model = copy.deepcopy(base).train()
    for p in model.parameters():
        p.requires_grad_(False)
    embeddings = model.get_input_embeddings()
    forward = torch.compile(model) if compile_ else model

    def step():
        x = embeddings(ids).detach().requires_grad_()
        forward(inputs_embeds=x).last_hidden_state.float().pow(2).mean().backward()
    return step, 0


VARIANTS = {
    "floor": floor_variant,
    "lora": rosafx_variant({ENCODER_LINEARS: LORA}),
    "lora-fused": rosafx_variant({ENCODER_LINEARS: LORA}, fuse=True),
    "lora-unmerged": patched(rosafx_variant({ENCODER_LINEARS: LORA}), "rosafx.ops.lowrank", "_merge_pays",
                             lambda *args: False),
    "lora-rebuilt": patched(rosafx_variant({ENCODER_LINEARS: LORA}), "rosafx.ops.lowrank", "kept_for_backward",
                            lambda *args: ()),
    "peft-lora": peft_variant("lora"),
    "rosa-robust": rosafx_variant({ENCODER_LINEARS: ROSA_R4}, masks=True),
    "rosa-robust-1pct": rosafx_variant({ENCODER_LINEARS: {"method": "rosa-robust", "rank": 8, "alpha": 16,
                                                          "density": 0.01}}, masks=True),
    "rosa-robust-unblocked": patched(rosafx_variant({ENCODER_LINEARS: ROSA_R4}, masks=True),
                                     "rosafx.ops.sparse", "_rows_per_block", lambda *args: 1 << 62),
    "vera": rosafx_variant({VERA_SITES: VERA}),
    "vera-fused": rosafx_variant({VERA_SITES: VERA}, fuse=True),
    "peft-vera": peft_variant("vera"),
}


def quartiles(values):
    if len(values) < 2:
        return (values[0],) * 3
    return tuple(statistics.quantiles(values, n=4, method="inclusive"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="floor,lora,peft-lora")
    parser.add_argument("--baseline", default="floor", help="ratios are against this variant")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed sample")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant's forward")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    unknown = [n for n in names + [args.baseline] if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if args.baseline not in names:
        names.insert(0, args.baseline)
    torch.manual_seed(0)
    base = load_base()
    ids = torch.randint(1000, 20000, (args.batch, args.seq))
    load_before = os.getloadavg()[0]
    variants, first_step_s = {}, {}
    for name in names:
        variants[name] = VARIANTS[name](base, ids, args.compile)
        start = time.perf_counter()
        variants[name][0]()                                # warm-up (compiles under --compile)
        first_step_s[name] = time.perf_counter() - start
        variants[name][0]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            step = variants[name][0]
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            samples[name].append((time.perf_counter() - start) / args.steps)
    base_s = samples[args.baseline]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
        "steps_per_sample": args.steps, "compile": args.compile, "baseline": args.baseline,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "variants": {},
    }
    print(f"{'variant':>17} {'trainable':>9} {'median ms':>10} {'p25–p75 ms':>15} {'vs ' + args.baseline:>9} "
          f"{'p25–p75':>13} {'first step s':>12}")
    for name in names:
        q = quartiles(samples[name])
        ratio = quartiles([a / b for a, b in zip(samples[name], base_s)])
        result["variants"][name] = {"trainable": variants[name][1], "step_s": q, "ratio": ratio,
                                    "first_step_s": first_step_s[name], "samples_s": samples[name]}
        print(f"{name:>17} {variants[name][1]:>9,} {q[1] * 1e3:>10.1f} {q[0] * 1e3:>7.1f}–{q[2] * 1e3:<7.1f} "
              f"x{ratio[1]:>7.3f} {ratio[0]:>6.3f}–{ratio[2]:<6.3f} {first_step_s[name]:>12.1f}")
    print(f"load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f}")
    if args.json:
        write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
