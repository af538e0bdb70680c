"""Where a llama-row step goes (bench/overhead.py's host-bound row): zero_grad, forward,
backward and optimizer.step timed apart, per variant, variants interleaved (order reversed on
odd repeats), 3 steps per repeat; each figure the median over all steps.

    python bench/step_parts.py [--variants floor,graph-floor,peft,rosafx,rosafx-unbanked] [--repeats 15]

floor and graph-floor have no trainable tensor: their optimizer is AdamW over one unused
tensor (what an empty step costs).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import rosafx
from overhead import LLAMA_LORA, LLAMA_PROJECTIONS, as_hidden, tiny_llama


def build(name, base, ids):
    """(model, forward returning a tensor, optimizer)"""
    if name in ("floor", "graph-floor"):
        embeddings = base.get_input_embeddings()
        if name == "floor":
            model = copy.deepcopy(base)
            for p in model.parameters():
                p.requires_grad_(False)
            run = lambda x: model(inputs_embeds=x).logits                            # noqa: E731
        else:
            from rosafx.pipeline.transform import capture_sites
            model = capture_sites(base, {"inputs_embeds": embeddings(ids).detach()}).module
            run = lambda x: as_hidden(model(inputs_embeds=x)).last_hidden_state     # noqa: E731
        model.train()
        return model, lambda: run(embeddings(ids).detach().requires_grad_()), \
            torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    if name == "peft":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_PROJECTIONS))
        call = lambda: model(input_ids=ids).logits                                   # noqa: E731
    else:
        model = rosafx.transform(base, {LLAMA_PROJECTIONS: LLAMA_LORA}, example_inputs=(ids,),
                                 bank=name != "rosafx-unbanked")
        call = lambda: as_hidden(model(ids)).last_hidden_state                     # noqa: E731
    model.train()
    return model, call, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="floor,graph-floor,peft,rosafx,rosafx-unbanked")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    base = tiny_llama()
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (1, 16))
    names = args.variants.split(",")
    variants = {name: build(name, base, ids) for name in names}
    parts = ("zero_grad", "forward", "backward", "step")
    times = {name: {part: [] for part in parts} for name in names}
    for r in range(args.repeats + 1):
        for name in (names if r % 2 == 0 else names[::-1]):
            _, call, optimizer = variants[name]
            for _ in range(3):
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                t1 = time.perf_counter()
                loss = call().float().pow(2).mean()
                t2 = time.perf_counter()
                loss.backward()
                t3 = time.perf_counter()
                optimizer.step()
                t4 = time.perf_counter()
                if r:                                                    # repeat 0 warms up
                    for part, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                        times[name][part].append(dt * 1e3)
    print(f"{'variant':>14} " + " ".join(f"{p + ' ms':>12}" for p in parts) + f" {'sum':>8}")
    for name in names:
        medians = [statistics.median(times[name][p]) for p in parts]
        print(f"{name:>14} " + " ".join(f"{m:>12.2f}" for m in medians) + f" {sum(medians):>8.1f}")
    print(f"load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
