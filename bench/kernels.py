"""Adapter kernels on a CUDA GPU: Triton (rosafx.kernels) vs unfused torch ops vs the torch
reference op vs HF PEFT's layer, forward + backward, one linear site.

Default shape: 8192 tokens, 4096 -> 4096, rank 16, bf16 activations and weight, fp32 adapter
tensors (rosafx's default). Each variant is timed with CUDA events over --iters steps after
warm-up; the figure is the median. Achieved FLOP rate counts the useful products (base
x·Wᵀ and dx = dy·W, plus the adapter's), bandwidth the bytes of x, W, y, dy, dx read or
written once; both are set against the device's peak where the device is in PEAKS.

    python bench/kernels.py [--tokens 8192] [--features 4096] [--rank 16] [--density 0.01] [--iters 20]

Without a CUDA device it says so and exits 0 (the kernels run on CPU only in the Triton
interpreter, which is for tests, not timing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys

import torch
import torch.nn.functional as F

# dense bf16 tensor-core TFLOP/s and HBM GB/s (vendor datasheets, SXM parts)
PEAKS = {"H100": (989.0, 3350.0), "H200": (989.0, 4800.0), "A100": (312.0, 2039.0)}


def peak_of(name: str):
    for key, value in PEAKS.items():
        if key in name:
            return value
    return None


def timed(step, iters: int) -> float:
    if not torch.cuda.is_available():           # --cpu-smoke: exercise the code, time nothing useful
        step()
        return float("nan")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(fn, inputs, dy):
    def step():
        for t in inputs:
            t.grad = None
        fn().backward(dy)
    return step


def lowrank_variants(x, W, A, B, scale):
    import rosafx  # noqa: F401  (registers the reference ops)
    from rosafx.kernels import lowrank_linear

    variants = {
        "triton (rosafx.kernels)": lambda: lowrank_linear(x, W, None, A, B, scale),
        "torch reference op": lambda: torch.ops.rosafx.lowrank_linear.default(x, W, None, A, B, scale, None),
        "unfused torch ops": lambda: F.linear(x, W) + (scale * ((x.float() @ A.t()) @ B.t())).to(x.dtype),
    }
    try:
        from peft import LoraConfig, get_peft_model

        class OneLinear(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=x.device, dtype=W.dtype)

            def forward(self, inputs):
                return self.proj(inputs)

        site = OneLinear()
        site.proj.weight.data.copy_(W)
        model = get_peft_model(site, LoraConfig(r=A.shape[0], lora_alpha=scale * A.shape[0], target_modules=["proj"]))
        layer = model.base_model.model.proj
        layer.lora_A["default"].weight.data.copy_(A)
        layer.lora_B["default"].weight.data.copy_(B)
        variants["HF PEFT lora.Linear"] = lambda: model(x)
    except Exception as error:  # peft missing or API moved: report, keep the other figures
        print(f"(HF PEFT layer unavailable: {error})")
    return variants


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None, help="write the figures here too")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every variant once on tiny CPU shapes (TRITON_INTERPRET=1) to check the script")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.tokens, args.features, args.rank, args.density = 40, 48, 4, 0.1
    elif not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here; the Triton kernels are timed only on a GPU "
              "(on CPU they run in the interpreter, for tests). Nothing measured.")
        return 0

    device, dtype = ("cpu", torch.float32) if args.cpu_smoke else ("cuda", torch.bfloat16)
    n, f, r = args.tokens, args.features, args.rank
    name = "CPU smoke run (timings meaningless)" if args.cpu_smoke else torch.cuda.get_device_name()
    peak = peak_of(name)
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(n, f, device=device, generator=g) * 0.5).to(dtype).requires_grad_()
    W = (torch.randn(f, f, device=device, generator=g) * f ** -0.5).to(dtype)
    A = (torch.randn(r, f, device=device, generator=g) * f ** -0.5).requires_grad_()
    B = (torch.randn(f, r, device=device, generator=g) * 0.01).requires_grad_()
    dy = torch.randn(n, f, device=device, dtype=dtype, generator=g)
    scale = 2.0

    base_flops = 2 * 2 * n * f * f                         # y = x·Wᵀ and dx = dy·W
    adapter_flops = 2 * n * r * f * 6                      # h, y+=hBᵀ, g, dx+=gA, dA, dB
    bytes_moved = 2 * (3 * n * f + f * f) + 2 * n * f      # x, y, dy, W read/written; dx written
    results = {"device": name, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
               "shape": {"tokens": n, "in": f, "out": f, "rank": r, "dtype": "bf16 (adapter fp32)"}, "lowrank": {}}
    print(f"{name}: {n} tokens, {f} -> {f}, rank {r}, {str(dtype)[6:]}, forward + backward")
    for label, fn in lowrank_variants(x, W, A, B, scale).items():
        params = [x, A, B]
        ms = timed(fwd_bwd(fn, params, dy), args.iters)
        tflops = (base_flops + adapter_flops) / ms / 1e9
        gbs = bytes_moved / ms / 1e6
        share = f" ({100 * tflops / peak[0]:.0f}% of {peak[0]:.0f} TFLOP/s, {100 * gbs / peak[1]:.0f}% of " \
                f"{peak[1]:.0f} GB/s)" if peak else ""
        print(f"  lowrank  {label:26s} {ms:8.3f} ms  {tflops:7.1f} TFLOP/s  {gbs:7.0f} GB/s{share}")
        results["lowrank"][label] = {"ms": ms, "tflops": tflops, "gbs": gbs}

    from rosafx.kernels import sparse_lowrank_linear, vera_linear
    nnz_mask = torch.rand(f, f, device=device, generator=g) < args.density
    S = torch.where(nnz_mask, torch.randn(f, f, device=device, generator=g) * 0.01, 0.0).to_sparse_csr()
    values = S.values().clone().requires_grad_()
    crow, col = S.crow_indices(), S.col_indices()
    sparse = {
        "triton (rosafx.kernels)": lambda: sparse_lowrank_linear(x, W, None, A, B, scale, crow, col, values),
        "torch reference op": lambda: torch.ops.rosafx.sparse_lowrank_linear.default(
            x, W, None, A, B, scale, crow, col, values, None),
    }
    results["sparse"] = {}
    for label, fn in sparse.items():
        ms = timed(fwd_bwd(fn, [x, A, B, values], dy), args.iters)
        print(f"  sparse   {label:26s} {ms:8.3f} ms  (density {args.density})")
        results["sparse"][label] = {"ms": ms}
    d = torch.full((r,), 0.1, device=device, requires_grad=True)
    b = torch.zeros(f, device=device).add_(0.01).requires_grad_()
    Bv = B.detach()
    vera = {
        "triton (rosafx.kernels)": lambda: vera_linear(x, W, None, A.detach(), Bv, d, b),
        "unfused torch ops": lambda: F.linear(x, W) + (b * ((d * (x.float() @ A.detach().t())) @ Bv.t())).to(dtype),
    }
    if hasattr(torch.ops.rosafx, "vera_linear"):     # registered by the vera method
        vera["torch reference op"] = lambda: torch.ops.rosafx.vera_linear.default(x, W, None, A.detach(), Bv, d, b)
    results["vera"] = {}
    for label, fn in vera.items():
        ms = timed(fwd_bwd(fn, [x, d, b], dy), args.iters)
        print(f"  vera     {label:26s} {ms:8.3f} ms")
        results["vera"][label] = {"ms": ms}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
