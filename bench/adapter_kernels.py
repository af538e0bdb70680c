"""Adapter kernels on a CUDA GPU: Triton (rosafx.kernels) vs unfused torch ops vs the torch
reference op vs HF PEFT's layer, forward + backward, one linear site.

Default shape: 8192 tokens, 4096 -> 4096, rank 16, bf16 activations and weight, fp32 adapter
tensors (rosafx's default). Each variant is timed with CUDA events over --iters steps after
warm-up; the figure is the median. Achieved FLOP rate counts the useful products (base
x·Wᵀ and dx = dy·W, plus the adapter's), bandwidth the bytes of x, W, y, dy, dx read or
written once; both are set against the device's peak where the device is in PEAKS.

    python bench/adapter_kernels.py [--tokens 8192] [--features 4096] [--rank 16] [--density 0.01] [--iters 20]

Without a CUDA device it says so and exits 0 (the kernels run on CPU only in the Triton
interpreter, which is for tests, not timing).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from common import write_json

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
        "base only (floor)": lambda: F.linear(x, W),
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


def profile(label: str, step, steps: int = 10) -> dict:
    """GPU kernel time vs wall time of ``steps`` fwd+bwd steps (torch.profiler): when the wall
    time is far above the kernels' sum, the step is bound by launch and Python overhead."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / steps
    kernels = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time / 1e3 / steps
    gpu_ms = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    print(f"  profile  {label}: wall {wall_ms:.3f} ms/step, GPU kernels {gpu_ms:.3f} ms/step, "
          f"{sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) // steps} launches/step")
    for name, ms in top:
        print(f"           {ms * 1e3:8.1f} us  {name[:90]}")
    return {"wall_ms": wall_ms, "gpu_kernel_ms": gpu_ms, "top": top}


def adapter_products(x, A, B, dy, iters):
    """Each of LoRA's six small products alone: the Triton kernel against cuBLAS (torch.mm on
    the same operands, fp32 adapter side). Shows which product costs what."""
    from rosafx.kernels.matmul import launch_shape, matmul
    x2, dy2 = x.detach(), dy
    A, B = A.detach(), B.detach()
    h = x2.float() @ A.t()
    g = dy2.float() @ B
    y = torch.empty(x2.shape[0], B.shape[0], device=x.device, dtype=x.dtype)
    dx = torch.empty_like(x2)
    cases = {                       # name: (triton call, torch call, M, N, K)
        "h = x·Aᵀ": (lambda: matmul(x2, A.t(), out_dtype=A.dtype), lambda: x2.float() @ A.t()),
        "y += s·h·Bᵀ": (lambda: matmul(h, B.t(), alpha=2.0, out=y, accumulate=True),
                        lambda: y.add_((h @ B.t()).to(y.dtype), alpha=2.0)),
        "g = dy·B": (lambda: matmul(dy2, B, out_dtype=A.dtype), lambda: dy2.float() @ B),
        "dx += g·A": (lambda: matmul(g, A, out=dx, accumulate=True), lambda: dx.add_((g @ A).to(dx.dtype))),
        "dA = gᵀ·x": (lambda: matmul(g.t(), x2, out_dtype=A.dtype), lambda: g.t() @ x2.float()),
        "dB = dyᵀ·h": (lambda: matmul(dy2.t(), h, out_dtype=B.dtype), lambda: dy2.t().float() @ h),
    }
    shapes = {"h = x·Aᵀ": (x2.shape[0], A.shape[0], A.shape[1]), "y += s·h·Bᵀ": (x2.shape[0], B.shape[0], A.shape[0]),
              "g = dy·B": (x2.shape[0], A.shape[0], B.shape[0]), "dx += g·A": (x2.shape[0], A.shape[1], A.shape[0]),
              "dA = gᵀ·x": (A.shape[0], A.shape[1], x2.shape[0]), "dB = dyᵀ·h": (B.shape[0], A.shape[0], x2.shape[0])}
    figures = {}
    for name, (mine, theirs) in cases.items():
        ms_mine, ms_torch = timed(mine, iters), timed(theirs, iters)
        M, N, K = shapes[name]
        print(f"  product  {name:12s} M={M:5d} N={N:5d} K={K:5d} launch {launch_shape(M, N, K)}: "
              f"triton {ms_mine * 1e3:7.1f} us, torch {ms_torch * 1e3:7.1f} us")
        figures[name] = {"triton_ms": ms_mine, "torch_ms": ms_torch, "mnk": [M, N, K]}
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None, help="write the figures here too")
    parser.add_argument("--profile", action="store_true", help="GPU kernel time vs wall time per low-rank variant")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every variant once on tiny CPU shapes (TRITON_INTERPRET=1) to check the script")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.tokens, args.features, args.rank, args.density = 40, 48, 4, 0.1
    elif not torch.cuda.is_available():
        print("bench/adapter_kernels.py: no CUDA device here; the Triton kernels are timed only on a GPU "
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
    results["products"] = adapter_products(x, A, B, dy, args.iters)
    if args.profile and torch.cuda.is_available():
        results["profile"] = {label: profile(label, fwd_bwd(fn, [x, A, B], dy)) for label, fn in
                              lowrank_variants(x, W, A, B, scale).items() if label != "unfused torch ops"}
    if args.json:
        write_json(Path(args.json), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
