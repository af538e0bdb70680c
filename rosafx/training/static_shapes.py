"""Static shapes for a compiled training step: pad a batch up to one of a few sizes.

A compiled step (``rosafx.fit(..., compile=True)``) is specialised to its input shapes, and a
CUDA graph replays one fixed shape. Batches padded to the longest row in each batch come in
as many lengths as the data has, so each new length would compile and record again. Here the
sequence dimension is padded up to the next power of two (at least ``SMALLEST``, at most
``max_length`` when given) and a short last batch gets padding rows up to the full batch, so
a run sees at most log2(max_length / SMALLEST) + 1 shapes.

Padding must leave the loss unchanged, so only what the model and loss are told to ignore is
added, and only keys whose padding is known:

    input_ids       pad_id          (attended by nobody: the mask below is 0 there)
    attention_mask  0               a padding row: 1 at position 0, 0 elsewhere, so its
                                    softmax stays finite (an all-masked row can give NaN,
                                    and 0·NaN in the backward would poison the gradients)
    token_type_ids  0
    labels          IGNORE_INDEX    per token (B x L) or per row (B, integer classes): the
                                    default ignore_index of F.cross_entropy; float labels
                                    (regression) cannot be ignored, so such rows are not added

A batch that is not a dict, or has no ``attention_mask``, passes through unchanged (the model
could not be told to ignore padding). Any other tensor with the sequence length is refused:
its padding is unknown.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rosafx.errors import RosafxError

IGNORE_INDEX = -100          # F.cross_entropy's default ignore_index
SMALLEST = 8
PAD_VALUES = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}  # None: pad_id


def bucket(length: int, max_length: int | None = None) -> int:
    """The padded length of a ``length``-token batch: the next power of two, at least SMALLEST,
    at most ``max_length`` (a batch longer than that, which the data should not hold, gets
    the power of two)."""
    padded = max(SMALLEST, 1 << max(0, length - 1).bit_length())
    if max_length is not None and length <= max_length:
        padded = min(padded, max_length)
    return padded


def bucket_count(max_length: int) -> int:
    """How many padded lengths ``bucket`` can give for batches up to ``max_length`` tokens."""
    return len({bucket(n, max_length) for n in range(1, max_length + 1)})


class StaticShapes:
    """Pads each batch dict to a bucketed length and to the most rows seen so far."""

    def __init__(self, pad_id: int = 0, max_length: int | None = None):
        self.pad_id, self.max_length = pad_id, max_length
        self.rows = 0

    def __call__(self, batch):
        if not isinstance(batch, dict) or not isinstance(batch.get("attention_mask"), torch.Tensor):
            return batch
        mask = batch["attention_mask"]
        if mask.dim() != 2:
            return batch
        rows, length = mask.shape
        target = bucket(length, self.max_length)
        self.rows = max(self.rows, rows)
        extra_rows = self.rows - rows if self._rows_can_be_padded(batch) else 0
        return {key: self._pad(key, value, rows, length, target - length, extra_rows)
                for key, value in batch.items()}

    @staticmethod
    def _rows_can_be_padded(batch: dict) -> bool:
        labels = batch.get("labels")
        return isinstance(labels, torch.Tensor) and not labels.is_floating_point() and not labels.is_complex()

    def _pad(self, key: str, value, rows: int, length: int, extra_length: int, extra_rows: int):
        if not isinstance(value, torch.Tensor):
            return value
        per_token = value.dim() >= 2 and value.shape[:2] == (rows, length)
        per_row = value.dim() >= 1 and value.shape[0] == rows and not per_token
        if not (per_token or per_row):
            return value
        if key not in PAD_VALUES:
            if per_token:
                raise RosafxError(f"compile=True pads batches to a few lengths, but the batch's {key!r} has the "
                                  f"sequence length and its padding value is unknown (known: {sorted(PAD_VALUES)}); "
                                  "drop it from the batch or pad the batches yourself to fixed lengths.")
            if extra_rows:
                raise RosafxError(f"compile=True pads a short batch with ignored rows, but the batch's {key!r} "
                                  "has one entry per row and its padding value is unknown.")
            return value
        fill = self.pad_id if PAD_VALUES[key] is None else PAD_VALUES[key]
        if per_token and extra_length:
            # F.pad's tuple runs from the last dim backwards: pad dim 1 (the sequence) on the right
            value = F.pad(value, (0, 0) * (value.dim() - 2) + (0, extra_length), value=fill)
        if extra_rows:
            padding = value.new_full((extra_rows, *value.shape[1:]), fill)
            if key == "attention_mask" and per_token:
                padding[:, 0] = 1
            value = torch.cat([value, padding])
        return value


__all__ = ["StaticShapes", "bucket", "bucket_count", "IGNORE_INDEX"]
