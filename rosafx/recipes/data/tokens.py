"""Tokenise once: every example is encoded in one call, stored as padded tensors, and
cached on disk (keyed by the texts, the tokenizer and the length) so a resumed or repeated
run does not tokenise again."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from rosafx.io.atomic import atomic_file
from rosafx.recipes.data.examples import Examples


@dataclasses.dataclass
class Encoded:
    task: str
    input_ids: torch.Tensor            # N x L, right-padded with pad_id
    lengths: torch.Tensor              # N
    token_type_ids: torch.Tensor | None
    labels: torch.Tensor | None        # N (long: classes, float: regression); None for causal-lm
    pad_id: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def pad_id_of(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)


def cache_key(examples: Examples, tokenizer, max_length: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                              max_length, examples.task]).encode())
    for part in (examples.texts, examples.pairs or [], examples.labels or []):
        digest.update(json.dumps(part).encode())
    return digest.hexdigest()[:24]


def encode(examples: Examples, tokenizer, max_length: int, cache_dir=None) -> Encoded:
    path = Path(cache_dir) / f"tokens-{cache_key(examples, tokenizer, max_length)}.pt" if cache_dir else None
    if path is not None and path.exists():
        return Encoded(**{"token_type_ids": None, "labels": None,
                          **torch.load(path, weights_only=True)})
    enc = tokenizer(examples.texts, examples.pairs, truncation=True, max_length=max_length)
    lengths = torch.tensor([len(ids) for ids in enc["input_ids"]], dtype=torch.long)
    width = int(lengths.max()) if len(lengths) else 1
    pad = pad_id_of(tokenizer)
    input_ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    token_types = torch.zeros((len(lengths), width), dtype=torch.long) if "token_type_ids" in enc else None
    for i, ids in enumerate(enc["input_ids"]):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        if token_types is not None:
            token_types[i, :len(ids)] = torch.tensor(enc["token_type_ids"][i])
    labels = None
    if examples.labels is not None:
        dtype = torch.float32 if examples.task == "regression" else torch.long
        labels = torch.tensor(examples.labels, dtype=dtype)
    encoded = Encoded(examples.task, input_ids, lengths, token_types, labels, pad)
    if path is not None:
        with atomic_file(path) as tmp:
            torch.save(encoded.to_dict(), tmp)
    return encoded
