"""Batches over encoded examples: made when iterated, padded per batch (to the longest in
the batch, never to the longest of the file), shuffled
per epoch from the run's seed, so the order is a function of (seed, epoch) and a resumed
run sees the same batches. ``set_epoch`` follows DistributedSampler's convention."""
from __future__ import annotations

import math

import torch

from rosafx.recipes.data.instructions import prompt_mask
from rosafx.recipes.data.tokens import Encoded

IGNORE = -100  # label of a padding token (causal-lm)


class Batches:
    def __init__(self, encoded: Encoded, batch_size: int, *, shuffle: bool = False, seed: int = 0):
        self.encoded, self.batch_size, self.shuffle, self.seed = encoded, batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.encoded) / self.batch_size)

    def order(self) -> torch.Tensor:
        n = len(self.encoded)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))

    def __iter__(self):
        order = self.order()
        for start in range(0, len(order), self.batch_size):
            yield self.batch(order[start:start + self.batch_size])

    def batch(self, index: torch.Tensor) -> dict:
        enc = self.encoded
        input_ids, token_type_ids, lengths = enc.padded(index)
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        if enc.task == "causal-lm":
            batch["labels"] = input_ids.masked_fill(attention_mask == 0, IGNORE)
            if enc.prompt_lengths is not None:  # instruction data: the loss covers the responses only
                batch["labels"].masked_fill_(prompt_mask(enc.prompt_lengths[index], input_ids.shape[1]), IGNORE)
        elif enc.labels is not None:
            batch["labels"] = enc.labels[index]
        return batch


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}
