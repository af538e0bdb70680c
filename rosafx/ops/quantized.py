"""Quantized frozen weights: the schemes (a table), packing, and the module that dequantizes.

A weight W (any 2-D layout, grouped along its last dimension) is stored as codes into a
scheme's level table and one fp32 scale per group of ``group_size`` weights:

    scale_g = max_{j in g} |W_j|                       (blockwise absmax)
    code_j  = argmin_k |W_j / scale_g − level_k|       (nearest level)
    Ŵ_j     = level_{code_j} · scale_g                 (what the graph computes with)

    scheme  levels (normalised to [-1, 1])                          bits  bytes / weight (g = 64)
    nf4     the 16 NormalFloat levels of QLoRA (Dettmers et al.     4     0.5 + 4/64 = 0.5625 (0.14x fp32)
            2023): quantiles of N(0, 1), scaled to [-1, 1], exact 0
    int4    k / 7, k = -7..7 (symmetric, per-group scale absmax/7)   4     0.5625 (0.14x)
    int8    k / 127, k = -127..127 (per-group scale absmax/127)      8     1.0625 (0.27x)

Four-bit codes are packed two to a byte (low nibble: the even column). Dequantizing is one
gather from a 256-row table (a byte -> its one or two levels) and one multiply by the
scales. Scales stay fp32: no double quantization (QLoRA's 8-bit scales would save another
0.03 byte per weight). torchao 0.18 was tried first (docs/quantization.md): its NF4Tensor
does not pass through rosafx's adapter ops and needs layers whose group count divides 256.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rosafx.errors import RosafxError

# QLoRA's NF4 (bitsandbytes' create_normal_map(offset=0.9677083)): 8 positive quantiles of
# N(0, 1), 7 negative ones and an exact 0, divided by the largest.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int                   # per code; 4-bit codes are packed two to a byte
    levels: tuple[float, ...]   # ascending, in [-1, 1]; a code is an index into it

    @property
    def per_byte(self) -> int:
        return 8 // self.bits


SCHEMES = {s.name: s for s in (
    Scheme("nf4", 4, NF4_LEVELS),
    Scheme("int4", 4, tuple(k / 7 for k in range(-7, 8))),
    Scheme("int8", 8, tuple(k / 127 for k in range(-127, 128))),
)}
DEFAULT_GROUP_SIZE = 64
MAX_GROUP_SIZE = 1 << 16


@dataclass(frozen=True)
class Quantization:
    """How a model's frozen linear weights are stored: a scheme of ``SCHEMES`` and its group size."""
    scheme: str
    group_size: int = DEFAULT_GROUP_SIZE

    @classmethod
    def parse(cls, value) -> "Quantization | None":
        """None, a scheme name, ``{"scheme": ..., "group_size": ...}`` or a Quantization."""
        if value is None or isinstance(value, Quantization):
            return value
        if isinstance(value, str):
            value = {"scheme": value}
        if not isinstance(value, dict) or set(value) - {"scheme", "group_size"}:
            raise RosafxError(f"quantize must be one of {sorted(SCHEMES)} or {{'scheme': ..., 'group_size': N}}, "
                              f"got {value!r}.")
        scheme, group_size = value.get("scheme"), value.get("group_size", DEFAULT_GROUP_SIZE)
        if group_size is None:
            group_size = DEFAULT_GROUP_SIZE
        if scheme not in SCHEMES:
            raise RosafxError(f"Unknown quantization scheme {scheme!r}: use one of {', '.join(sorted(SCHEMES))}.")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not 2 <= group_size <= MAX_GROUP_SIZE \
                or group_size % 2:
            raise RosafxError(f"The quantization group size must be an even integer in [2, {MAX_GROUP_SIZE}], "
                              f"got {group_size!r} (QLoRA uses 64).")
        return cls(scheme, group_size)

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size}

    def check_fits(self, name: str, shape: tuple[int, ...]) -> None:
        if shape[-1] % self.group_size:
            divisors = [g for g in (128, 64, 32, 16, 8) if shape[-1] % g == 0]
            hint = f"e.g. {divisors[0]}" if divisors else "or leave the layer out"
            raise RosafxError(f"Quantization group size {self.group_size} does not divide the {shape[-1]} columns "
                              f"of '{name}' {tuple(shape)}: use a group size that does ({hint}).")


def _byte_table(scheme: Scheme) -> Tensor:
    """256 x per_byte: the levels one stored byte decodes to (low nibble first)."""
    levels = torch.tensor(scheme.levels + (0.0,) * ((1 << scheme.bits) - len(scheme.levels)), dtype=torch.float32)
    codes = torch.arange(256)
    if scheme.per_byte == 1:
        return levels[codes].unsqueeze(1)
    return torch.stack([levels[codes & 15], levels[codes >> 4]], dim=1)


_TABLES = {name: _byte_table(scheme) for name, scheme in SCHEMES.items()}


def quantize(weight: Tensor, q: Quantization) -> tuple[Tensor, Tensor]:
    """(packed codes uint8: rows x cols/per_byte, scales fp32: rows x groups) of a 2-D weight."""
    scheme = SCHEMES[q.scheme]
    rows, cols = weight.shape
    groups = weight.detach().float().reshape(rows, cols // q.group_size, q.group_size)
    scales = groups.abs().amax(dim=2)
    normalised = groups / scales.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(2)
    levels = torch.tensor(scheme.levels, dtype=torch.float32, device=weight.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(normalised, midpoints).to(torch.uint8).reshape(rows, cols)  # nearest level
    if scheme.per_byte == 2:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes.contiguous(), scales.contiguous()


def dequantize(packed: Tensor, scales: Tensor, scheme: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Ŵ = level[code] · scale of its group, rows x (groups · group_size), in ``dtype``."""
    table = _TABLES[scheme]
    if table.device != packed.device:
        table = table.to(packed.device)
    rows, groups = scales.shape
    # index_select over the flat codes: ~6x faster on a CPU than advanced indexing (table[codes])
    values = table.index_select(0, packed.reshape(-1).long()).reshape(rows, groups, -1) * scales.unsqueeze(2)
    return values.reshape(rows, -1).to(dtype)


def packed_bytes(weight_shape: tuple[int, int], q: Quantization) -> int:
    """Bytes a weight of this shape takes quantized (codes + fp32 scales)."""
    rows, cols = weight_shape
    return rows * cols // SCHEMES[q.scheme].per_byte + rows * (cols // q.group_size) * 4


class QuantizedWeight(nn.Module):
    """A frozen weight held packed; calling the module gives the dequantized weight. The
    graph reads it with a ``call_module`` node where it read the parameter before.

    ``held``: during calibration (lora-ga, rosa-robust) the dequantized weight is kept as one
    leaf tensor, so that its gradient can be read; otherwise each call dequantizes afresh."""

    def __init__(self, weight: Tensor, q: Quantization, weight_name: str):
        super().__init__()
        packed, scales = quantize(weight, q)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.scheme, self.group_size, self.weight_name = q.scheme, q.group_size, weight_name
        self.weight_dtype = weight.dtype
        self.held: Tensor | None = None

    def forward(self) -> Tensor:
        if self.held is not None:
            return self.held
        weight = dequantize(self.packed, self.scales, self.scheme, self.weight_dtype)
        if _SAVES.depth:
            _SAVES.produced[weight.untyped_storage().data_ptr()] = (weakref.ref(weight), self)
        return weight

    def hold(self) -> Tensor:
        if self.held is None:
            self.held = dequantize(self.packed, self.scales, self.scheme, self.weight_dtype)
        return self.held

    def release(self) -> None:
        self.held = None

    def extra_repr(self) -> str:
        return f"{self.weight_name}: {self.scheme}, group {self.group_size}, {tuple(self.packed.shape)} bytes"


class _Saves:
    """Dequantized weights produced inside ``saving_packed`` (storage address -> (weak
    reference, module)); a weak reference that is still alive proves the address is the
    weight's and not a later tensor's."""
    depth = 0
    produced: dict[int, tuple] = {}


_SAVES = _Saves()


def _pack(tensor: Tensor):
    entry = _SAVES.produced.get(tensor.untyped_storage().data_ptr())
    if entry is not None:
        weight = entry[0]()
        if weight is not None and weight.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            return (entry[1], tuple(tensor.shape), tensor.stride(), tensor.storage_offset())
    return tensor


def _unpack(saved):
    if isinstance(saved, tuple):
        module, size, stride, offset = saved
        return module().as_strided(size, stride, offset)
    return saved


class saving_packed:
    """Within it, autograd saves a dequantized weight (or a view of one) as a reference to
    its packed module and dequantizes it again in the backward, so a training step holds
    codes + scales rather than one fp32 copy of every weight between forward and backward.
    Costs one more dequantization per weight and step (about 1.5 ms for 384 x 1536 on one
    CPU thread). ``enter``/``exit`` let module hooks open it around a forward."""

    def __init__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)

    def __enter__(self):
        _SAVES.depth += 1
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        _SAVES.depth -= 1
        if not _SAVES.depth:
            _SAVES.produced.clear()
        return False
