"""One training step of a random-init Llama in bf16 on a CUDA GPU: rosafx on the Triton
kernels, rosafx on the torch ops, HF PEFT, and the frozen floor. Tokens/s and peak memory.

Default config: ~1.1B parameters (hidden 2048, 22 layers, MLP 5632, 32 heads, 4 KV heads,
vocabulary 32000; TinyLlama's shape), batch 4 x 1024 tokens, LoRA rank 16 alpha 32 on every
q/k/v/o/gate/up/down projection, adapter tensors fp32 (rosafx's and PEFT's default: PEFT
keeps its LoRA weights in fp32 when autocast_adapter_dtype is on), AdamW over the adapters,
next-token cross-entropy. The floor is the frozen base with backward for the input
embeddings' gradient only: no adapter can be cheaper.

Variants are interleaved, repeat after repeat; each figure is the median over repeats of
the mean step time of --steps steps (CUDA events), with the 25th-75th percentile. Peak
memory is torch.cuda.max_memory_allocated over the variant's own steps, minus what every
variant holds before it runs (the shared base weights).

    python bench/gpu_step.py [--layers 22] [--batch 4] [--seq 1024] [--repeats 5] [--steps 3] [--json OUT]
                             [--profile] [--compile reduce-overhead]

Without a CUDA device it says so and exits 0.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import write_json

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         attention_dropout=0.0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def next_token_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


COMPILE = {"mode": None}     # --compile MODE: every variant's forward through torch.compile(mode=MODE)


def compiled(module):
    return torch.compile(module, mode=COMPILE["mode"]) if COMPILE["mode"] else module


def adapter_step(model, ids, call):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        next_token_loss(call(), ids).backward()
        optimizer.step()
    return step, sum(p.numel() for p in params)


_captured = []     # one capture serves both backends (a copy is lowered)


def rosafx_variant(backend):
    def build(base, ids, rank):
        import rosafx
        if not _captured:
            rule = {"method": "lora", "rank": rank, "alpha": 2 * rank}
            _captured.append(rosafx.transform(base, {f"re:.*\\.({'|'.join(LORA_TARGETS)})$": rule},
                                              example_inputs=(ids,)))
        adapted = rosafx.lower(copy.deepcopy(_captured[0]), backend=backend)
        forward = compiled(adapted)
        return adapter_step(adapted, ids, lambda: forward(ids).logits)
    return build


def peft_variant(base, ids, rank):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS))
    forward = compiled(model)
    return adapter_step(model, ids, lambda: forward(input_ids=ids).logits)


def floor_variant(base, ids, rank):
    model = base.train()
    embeddings = model.get_input_embeddings()
    forward = compiled(model)

    def step():
        x = embeddings(ids).detach().requires_grad_()
        next_token_loss(forward(inputs_embeds=x).logits, ids).backward()
    return step, 0


VARIANTS = {"floor": floor_variant, "rosafx-triton": rosafx_variant("triton"),
            "rosafx-torch": rosafx_variant("torch"), "peft": peft_variant}


def time_steps(step, steps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / steps


def profile(name, step) -> dict:
    """One step under torch.profiler: wall time, the sum of GPU kernel time, and launches. A
    wall time well above the kernels' sum means the GPU waits on the CPU (launch overhead)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = time_steps(step, 1)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_s = sum(e.device_time for e in kernels) / 1e6
    by_name = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:6]
    print(f"  profile {name}: wall {wall * 1e3:.1f} ms, GPU kernels {gpu_s * 1e3:.1f} ms, {len(kernels)} launches")
    for kernel, ms in top:
        print(f"      {ms:8.2f} ms  {kernel[:90]}")
    return {"wall_ms": wall * 1e3, "gpu_kernel_ms": gpu_s * 1e3, "launches": len(kernels), "top": top}


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q[0], statistics.median(values), q[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--compile", metavar="MODE", help="torch.compile every variant's forward with this mode "
                        "(e.g. reduce-overhead: CUDA graphs hide the launch overhead); the first step's compile "
                        "time is reported as setup")
    parser.add_argument("--profile", action="store_true", help="GPU kernel time vs wall time of one step per variant")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_step.py: no CUDA device here; nothing measured.")
        return 0
    names = args.variants.split(",")
    COMPILE["mode"] = args.compile
    base = llama(args.layers)
    base.requires_grad_(False)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    n_params = sum(p.numel() for p in base.parameters())
    print(f"{torch.cuda.get_device_name()}: Llama {n_params / 1e9:.2f}B params bf16, {args.layers} layers, "
          f"batch {args.batch} x {args.seq} tokens, LoRA r{args.rank} on {len(LORA_TARGETS)} projections")
    steps, trainables, setup_s, peaks = {}, {}, {}, {}
    for name in names:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        steps[name], trainables[name] = VARIANTS[name](base, ids, args.rank)
        steps[name]()                               # first step: kernels compiled, autotuned, cached
        torch.cuda.synchronize()
        setup_s[name] = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        base_now = torch.cuda.memory_allocated()
        steps[name]()
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base_now) / 2 ** 30
        print(f"  built {name}: {trainables[name]:,} trainable, setup {setup_s[name]:.1f} s, "
              f"step peak {peaks[name]:.2f} GiB over the {held / 2 ** 30:.2f} GiB held before it")
    samples = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            samples[name].append(time_steps(steps[name], args.steps))
    tokens = args.batch * args.seq
    results = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
               "command": " ".join(sys.argv), "torch": torch.__version__, "params": n_params,
               "tokens_per_step": tokens, "variants": {}}
    floor = statistics.median(samples["floor"]) if "floor" in samples else None
    print(f"{'variant':15s} {'step ms (p25-p75)':>24s} {'tokens/s':>10s} {'x floor':>8s} {'peak GiB':>9s}")
    for name in names:
        lo, mid, hi = quartiles(samples[name])
        ratio = mid / floor if floor else float("nan")
        print(f"{name:15s} {mid * 1e3:9.1f} ({lo * 1e3:6.1f}-{hi * 1e3:6.1f}) {tokens / mid:10.0f} "
              f"{ratio:8.3f} {peaks[name]:9.2f}")
        results["variants"][name] = {"step_s": mid, "p25": lo, "p75": hi, "tokens_per_s": tokens / mid,
                                     "x_floor": ratio, "peak_gib": peaks[name], "trainable": trainables[name],
                                     "setup_s": setup_s[name], "samples": samples[name]}
    if args.profile:
        results["profile"] = {name: profile(name, steps[name]) for name in names}
    if args.json:
        write_json(Path(args.json), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
