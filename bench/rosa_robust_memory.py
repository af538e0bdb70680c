"""Memory of rosa-robust's trainable state against a dense-masked implementation.

all-MiniLM-L6-v2, every encoder linear (36 sites), rank 16, density 1 %. After one AdamW
step we count, per variant, the bytes held between steps by the adapter: parameters,
index buffers, gradients and AdamW's state (exp_avg, exp_avg_sq, step). Transients inside
a step are not part of this count.

* rosa-robust (rosafx): values in CSR order (fp32) + int64 column indices + int64 row
  offsets; the values' gradient and AdamW state have |M| entries.
* dense-masked: the same update written the obvious way, S as a dense out x in fp32
  Parameter, a bool out x in mask buffer, W_eff = W + S ⊙ mask; its gradient and AdamW
  state are out x in each.

Both use the same masks (those rosafx.calibrate picked) and the same low-rank part, so the
comparison isolates the sparse part.

    python bench/rosa_robust_memory.py [--rank 16] [--density 0.01] [--json FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch
import torch.nn.functional as F
from torch import nn

import rosafx
from common import ENCODER_LINEARS, load_encoder, sst2_split
from rosafx.graph.adapted_graph import adapters_of

LOW_RANK = ("lora_A", "lora_B")


def calibration_batches(tokenizer, n=4, batch=8):
    """n batches of SST-2 sample sentences (what they say moves the masks, not their size)."""
    texts = sst2_split()[0].texts[: n * batch]
    return [tokenizer(texts[i * batch:(i + 1) * batch], padding=True, return_tensors="pt")["input_ids"]
            for i in range(n)]


def loss_of(model, ids):
    return model(ids).last_hidden_state.float()[..., :2].pow(2).mean()  # LayerNorm makes the full mean constant


def one_step(model, ids, params):
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    optimizer.zero_grad()
    loss_of(model, ids).backward()
    optimizer.step()
    return optimizer


def state_bytes(optimizer, tensors_of_param) -> int:
    return sum(v.nbytes for p in tensors_of_param for v in optimizer.state[p].values() if torch.is_tensor(v))


def measure_rosafx(model, batches, rank, density):
    adapted = rosafx.transform(model, {ENCODER_LINEARS: {"method": "rosa-robust", "rank": rank, "alpha": 16,
                                                         "density": density}})
    rosafx.calibrate(adapted, batches, loss_of, progress=False)
    adapters = adapters_of(adapted)
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = one_step(adapted, batches[0], params)
    parts = empty_parts()
    masks, nnz = {}, 0
    for adapter in adapters.values():
        for name, p in adapter.named_parameters():
            part = parts["low_rank" if name in LOW_RANK else "sparse"]
            part["params"] += p.nbytes
            part["grads"] += p.grad.nbytes if p.grad is not None else 0
            part["adamw"] += state_bytes(optimizer, [p])
            if name not in LOW_RANK:
                nnz += p.numel()
        for name, b in adapter.named_buffers():
            if name != "base_weight":
                parts["sparse"]["indices"] += b.nbytes
        masks[adapter.site_path] = dense_mask(adapter)
    return parts, masks, nnz, adapters


def dense_mask(adapter) -> torch.Tensor:
    """The adapter's mask as a dense bool matrix (for the dense-masked variant only)."""
    rows = torch.repeat_interleave(torch.arange(adapter.out_features), adapter.crow_indices.diff())
    mask = torch.zeros(adapter.out_features, adapter.in_features, dtype=torch.bool)
    mask[rows, adapter.col_indices] = True
    return mask


class DenseMaskedLinear(nn.Module):
    """W_eff = W + s·B·A + S ⊙ mask with S a dense out x in Parameter."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        self.linear = linear
        self.register_buffer("mask", mask)
        self.sparse = nn.Parameter(torch.zeros(mask.shape))
        self.lora_A = nn.Parameter(torch.randn(rank, linear.in_features) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x):
        weight = self.linear.weight + self.sparse * self.mask
        return F.linear(x, weight, self.linear.bias) + self.scale * (x @ self.lora_A.t()) @ self.lora_B.t()


def measure_dense(model, batches, masks, rank):
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for path, mask in masks.items():
        owner, _, name = path.rpartition(".")
        parent = model.get_submodule(owner)
        module = DenseMaskedLinear(getattr(parent, name), mask, rank, 16.0)
        setattr(parent, name, module)
        wrapped.append(module)
    params = [p for m in wrapped for p in (m.sparse, m.lora_A, m.lora_B)]
    optimizer = one_step(model, batches[0], params)
    parts = empty_parts()
    for m in wrapped:
        for key, tensors in (("sparse", [m.sparse]), ("low_rank", [m.lora_A, m.lora_B])):
            for p in tensors:
                parts[key]["params"] += p.nbytes
                parts[key]["grads"] += p.grad.nbytes
                parts[key]["adamw"] += state_bytes(optimizer, [p])
        parts["sparse"]["indices"] += m.mask.nbytes
    return parts


def empty_parts() -> dict:
    return {part: {"params": 0, "indices": 0, "grads": 0, "adamw": 0} for part in ("sparse", "low_rank")}


def total(part: dict) -> int:
    return sum(part.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_encoder()
    batches = calibration_batches(tokenizer)
    rosa, masks, nnz, adapters = measure_rosafx(model, batches, args.rank, args.density)
    budget = sum(int(args.density * a.out_features * a.in_features) for a in adapters.values())
    model2, _ = load_encoder()
    dense = measure_dense(model2, batches, masks, args.rank)
    mib = 2 ** 20
    print(f"all-MiniLM-L6-v2, {len(adapters)} encoder linears, rank {args.rank}, density {args.density:.2%}: "
          f"{nnz:,} sparse values (budget Σ⌊d·out·in⌋ = {budget:,})")
    print(f"{'part':10} {'variant':13} {'params':>9} {'indices':>9} {'grads':>9} {'adamw':>9} {'total MiB':>10}")
    for key in ("sparse", "low_rank"):
        for variant, parts in (("rosa-robust", rosa), ("dense-masked", dense)):
            p = parts[key]
            print(f"{key:10} {variant:13} " + " ".join(f"{p[c] / mib:9.3f}" for c in ("params", "indices", "grads", "adamw"))
                  + f" {total(p) / mib:10.3f}")
    ratio = total(rosa["sparse"]) / total(dense["sparse"])
    whole = (total(rosa["sparse"]) + total(rosa["low_rank"])) / (total(dense["sparse"]) + total(dense["low_rank"]))
    print(f"sparse part: rosa-robust / dense-masked = {ratio:.4f}x (target <= 0.1x); whole adapter: {whole:.4f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "machine": platform.machine(),
                       "torch": torch.__version__, "rank": args.rank, "density": args.density, "nnz": nnz,
                       "rosa_robust": rosa, "dense_masked": dense, "sparse_ratio": ratio, "whole_ratio": whole},
                      f, indent=2)


if __name__ == "__main__":
    main()
