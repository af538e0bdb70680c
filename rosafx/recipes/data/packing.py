"""Packing: short causal-lm examples share rows of ``--max-length`` tokens, and attention stays
inside each example.

A packed row holds examples end to end. Each token gets its position within its own example
(``position_ids`` restart at 0) and a boolean 4-D ``attention_mask`` (batch, 1, row, row),
True where a token may attend: the earlier tokens of its own example (block-diagonal and
causal). Padding tokens attend to themselves only (a row of no True gives NaN). The first
token of each example is labelled -100, so no example predicts the next one's start. Hugging
Face decoders that build their mask with ``transformers.masking_utils`` take a 4-D mask as
given; ``check_keeps_examples_apart`` asks the model itself (as heads.check_sees_no_future
does) and refuses ``--pack`` when its attention cannot take one (the eager attention adds the
mask as numbers, so a boolean one is wrong there).

Rows are filled best-fit decreasing (longest example first, into the fullest row it fits), once;
the order of rows is a function of (seed, epoch), as ``Batches``' order of examples.
"""
from __future__ import annotations

import bisect
import math

import torch

from rosafx.errors import RosafxError
from rosafx.recipes.data.batches import IGNORE
from rosafx.recipes.data.tokens import Encoded


def pack(lengths: list[int], width: int) -> list[list[int]]:
    """Example indices per row, each row at most ``width`` tokens (an example longer than
    ``width`` does not occur: the tokens are truncated to --max-length)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []   # (room left, row), sorted: the fullest row that fits is found by bisect
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = width, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (room - lengths[i], row))
    return [sorted(row) for row in rows]


class PackedBatches:
    """``Batches``' interface over packed rows: ``batch_size`` rows a batch."""

    def __init__(self, encoded: Encoded, batch_size: int, width: int, *, shuffle: bool = False, seed: int = 0):
        self.encoded, self.batch_size, self.width, self.shuffle, self.seed = encoded, batch_size, width, shuffle, seed
        self.rows = pack(encoded.lengths.tolist(), width)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.rows))
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))

    def __iter__(self):
        order = self.order().tolist()
        for start in range(0, len(order), self.batch_size):
            yield packed_batch(self.encoded, [self.rows[r] for r in order[start:start + self.batch_size]])


def packed_batch(encoded: Encoded, rows: list[list[int]]) -> dict:
    """input_ids, attention_mask (B, 1, W, W) bool, position_ids and labels of these rows of examples."""
    lengths = encoded.lengths
    width = max(int(lengths[row].sum()) for row in rows) if rows else 0
    input_ids = torch.full((len(rows), width), encoded.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            n = int(lengths[i])
            tokens = encoded.ids[encoded.offsets[i]:encoded.offsets[i + 1]].long()
            input_ids[r, at:at + n] = tokens
            position_ids[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = k
            first_label = int(encoded.prompt_lengths[i]) if encoded.prompt_lengths is not None else 0
            labels[r, at + max(first_label, 1):at + n] = tokens[max(first_label, 1):]  # never an example's first token
            at += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    allowed = (same & causal) | torch.eye(width, dtype=torch.bool)   # padding attends to itself
    return {"input_ids": input_ids, "attention_mask": allowed[:, None], "position_ids": position_ids, "labels": labels}


def check_keeps_examples_apart(model, directory) -> None:
    """Refuse --pack for a model whose logits for an example change when another example is packed
    before it: its attention does not take the block-diagonal mask and position ids."""
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(3, vocab, (1, n), generator=generator) % vocab for n in (3, 4))
    ids = torch.cat([first, second], 1)
    segment = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    mask = (segment[:, None] == segment[None, :]) & torch.ones(7, 7, dtype=torch.bool).tril()
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with torch.no_grad():
        try:
            packed = model(input_ids=ids, attention_mask=mask[None, None], position_ids=positions).logits.float()
        except Exception as exc:  # noqa: BLE001  (a model that refuses a 4-D mask says so in its own way)
            packed, error = None, f"{type(exc).__name__}: {str(exc).strip()[:120]}"
        alone = model(input_ids=second).logits.float()
    implementation = getattr(model.config, "_attn_implementation", None)
    if packed is None or not torch.allclose(packed[0, 3:], alone[0], rtol=1e-4, atol=1e-4):
        why = error if packed is None else "an example's logits change when another is packed before it"
        raise RosafxError(f"{directory} ({type(model).__name__}, attention {implementation}) cannot train packed rows: "
                          f"{why}. Train without --pack (each example in its own row).")
