"""Launch-shape sweep of the shared adapter matmul kernel (kernels/matmul.py) on a CUDA GPU:
for each of LoRA's six products at a given shape, time a grid of tile sizes, K splits, warps,
pipeline stages and operand precision (TF32 with the half side raised, or bf16 MMA with the
fp32 side rounded), and print the best few against cuBLAS on the same operands. The launch
heuristic in kernels/matmul.py (``launch_shape``) is set from this.

    python bench/matmul_sweep.py [--tokens 8192] [--features 4096] [--rank 16] [--json OUT]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from common import write_json
from rosafx.kernels.matmul import _matmul_kernel, launch_shape


def launch(a, b, out, accumulate, cfg):
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk, split, warps, stages, down = cfg
    k_per = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_per)
    if split > 1 and not accumulate:
        out.zero_()
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split)
    _matmul_kernel[grid](a, b, out, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         out.stride(0), out.stride(1), 1.0, k_per,
                         ACCUMULATE=accumulate, UPCAST=a.dtype != b.dtype, IEEE=False, HAS_COL_SCALE=False,
                         ATOMIC=split > 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                         DOWNCAST=tl.bfloat16 if down else None, num_warps=warps, num_stages=stages)


def configs(M, N, K, casts=(0, 1)):
    thin = min(M, N) <= 32
    if thin and K > 64:        # long reduction into a thin output
        small = 16 if min(M, N) <= 16 else 32
        for long_, bk, split, down in itertools.product((64, 128), (64, 128), (2, 4, 8, 16), casts):
            bm, bn = (long_, small) if M >= N else (small, long_)
            yield bm, bn, bk, split, 4, 3, down
    else:                      # wide output, K = rank
        bk = max(16, triton.next_power_of_2(K))
        for bm, bn, warps, down in itertools.product((64, 128), (64, 128, 256), (4, 8), casts):
            if bm * bn <= 128 * 256:
                yield bm, bn, bk, 1, warps, 3, down


def refine(best, M, N, K):
    bm, bn, bk, split, _, _, down = best
    for warps, stages in itertools.product((4, 8), (2, 3, 4)):
        yield bm, bn, bk, split, warps, stages, down


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json")
    parser.add_argument("--precision", choices=("both", "tf32", "bf16"), default="both",
                        help="TF32 with the half side raised, bf16 MMA with the fp32 side rounded, or both")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/matmul_sweep.py: no CUDA device here; nothing measured.")
        return 0
    n, f, r = args.tokens, args.features, args.rank
    x = torch.randn(n, f, device="cuda").bfloat16()
    dy = torch.randn(n, f, device="cuda").bfloat16()
    A, B = torch.randn(r, f, device="cuda") * 0.02, torch.randn(f, r, device="cuda") * 0.02
    h, g = x.float() @ A.t(), dy.float() @ B
    y, dx = torch.empty_like(x), torch.empty_like(x)
    products = {   # name: (a, b, out, accumulate)
        "h = x·Aᵀ": (x, A.t(), torch.empty(n, r, device="cuda"), False),
        "y += h·Bᵀ": (h, B.t(), y, True),
        "g = dy·B": (dy, B, torch.empty(n, r, device="cuda"), False),
        "dx += g·A": (g, A, dx, True),
        "dA = gᵀ·x": (g.t(), x, torch.empty(r, f, device="cuda"), False),
        "dB = dyᵀ·h": (dy.t(), h, torch.empty(f, r, device="cuda"), False),
    }
    print(f"{torch.cuda.get_device_name()}: {n} tokens, {f} features, rank {r}")
    report = {"device": torch.cuda.get_device_name(), "shape": [n, f, r], "products": {}}
    for name, (a, b, out, acc) in products.items():
        M, K = a.shape
        N = b.shape[1]
        moved = (a.numel() * a.element_size() + b.numel() * b.element_size()
                 + out.numel() * out.element_size() * (2 if acc else 1))
        timings = {}

        def run(cfg):
            try:
                timings[cfg] = do_bench(lambda: launch(a, b, out, acc, cfg), warmup=5, rep=20)
            except Exception as error:   # a config the compiler refuses (shared memory): skip it
                timings[cfg] = float("inf")
        casts = {"both": (0, 1), "tf32": (0,), "bf16": (1,)}[args.precision]
        for cfg in configs(M, N, K, casts):
            run(cfg)
        best = min(timings, key=timings.get)
        for cfg in refine(best, M, N, K):
            if cfg not in timings:
                run(cfg)
        af, bf = (a.float(), b.float())
        cublas = do_bench(lambda: torch.mm(af, bf), warmup=5, rep=20)
        current = launch_shape(M, N, K)
        heuristic = (*current, 4, 3, 0)
        if heuristic not in timings:
            run(heuristic)
        ranked = sorted(timings.items(), key=lambda kv: kv[1])
        print(f"{name:11s} M={M} N={N} K={K}: cuBLAS fp32 {cublas * 1e3:6.1f} us; "
              f"heuristic {heuristic} {timings[heuristic] * 1e3:6.1f} us; best of {len(timings)}:")
        for cfg, ms in ranked[:4]:
            print(f"    {ms * 1e3:7.1f} us  {moved / ms / 1e6:6.0f} GB/s  (BM, BN, BK, split, warps, stages, bf16)={cfg}")
        report["products"][name] = {"mnk": [M, N, K], "cublas_fp32_ms": cublas, "bytes": moved,
                                    "heuristic": [list(heuristic), timings[heuristic]],
                                    "best": [[list(c), t] for c, t in ranked[:8]]}
    if args.json:
        write_json(Path(args.json), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
