"""Tokenise once, in chunks, into flat storage: every example's tokens end to end (int32,
no padding) with each example's offset, so memory and the on-disk cache grow with the
tokens the data holds, not with rows x the longest row. Batches pad per batch
(``Encoded.padded``). The cache is keyed by the texts, the tokenizer and the length, so a
resumed or repeated run does not tokenise again."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import torch

from rosafx.io.atomic import atomic_file
from rosafx.recipes.data.examples import Examples

CHUNK = 2048          # examples per tokenizer call: the tokenizer's Python lists live for one chunk only
CACHE_VERSION = 3     # 1 stored N x longest-row padded tensors; 2 had no prompt lengths


@dataclasses.dataclass
class Encoded:
    """Example i's tokens are ``ids[offsets[i]:offsets[i + 1]]`` (and the same slice of
    ``token_type_ids``)."""
    task: str
    ids: torch.Tensor                  # all tokens, int32
    offsets: torch.Tensor              # N + 1, int64, from 0
    token_type_ids: torch.Tensor | None
    labels: torch.Tensor | None        # N (long: classes, float: regression); None for causal-lm
    pad_id: int
    prompt_lengths: torch.Tensor | None = None   # N (instruction data): each example's first tokens are its prompt
    truncated_prompts: int = 0                   # prompts that lost their first tokens to --max-length
    truncated_responses: int = 0                 # responses cut to --max-length - 1 tokens

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def tokens(self, i: int) -> list[int]:
        return self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()

    def padded(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(input_ids, token_type_ids or None, lengths) of the examples ``index``, right-padded
        to the longest of them (long tensors, as the model takes)."""
        starts = self.offsets[index]
        lengths = self.offsets[index + 1] - starts
        width = int(lengths.max()) if len(index) else 0
        position = torch.arange(width)
        real = position < lengths[:, None]
        # past a row's end, gather index 0 (any valid index): the pad value replaces it
        gather = torch.where(real, starts[:, None] + position, 0)

        def take(flat: torch.Tensor, fill: int) -> torch.Tensor:
            if len(flat) == 0:
                return torch.full(real.shape, fill, dtype=torch.long)
            return torch.where(real, flat[gather].long(), fill)
        types = take(self.token_type_ids, 0) if self.token_type_ids is not None else None
        return take(self.ids, self.pad_id), types, lengths

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def pad_id_of(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)


def cache_key(examples: Examples, tokenizer, max_length: int) -> str:
    """A digest of what the tokens depend on, hashed text by text (no copy of the whole data)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
                              len(tokenizer), max_length, examples.task]).encode())
    template = getattr(tokenizer, "chat_template", None) if examples.messages is not None else None
    digest.update(json.dumps([template, examples.columns]).encode())
    messages = [json.dumps(m, sort_keys=True) for m in examples.messages] if examples.messages is not None else []
    for part in (examples.texts, examples.pairs or [], examples.responses or [], messages):
        digest.update(b"\x00part")
        for text in part:
            data = text.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little") + data)
    digest.update(json.dumps(examples.labels or []).encode())
    return digest.hexdigest()[:24]


def encode(examples: Examples, tokenizer, max_length: int, cache_dir=None) -> Encoded:
    path = Path(cache_dir) / f"tokens-{cache_key(examples, tokenizer, max_length)}.pt" if cache_dir else None
    if path is not None and path.exists():
        cached = from_cache(path)
        if cached is not None:
            return cached
    if examples.responses is not None:
        encoded = encode_instructions(examples, tokenizer, max_length)
    else:
        encoded = encode_texts(examples, tokenizer, max_length)
    if path is not None:
        with atomic_file(path) as tmp, open(tmp, "wb") as handle:  # a file object: a full disk is
            torch.save(encoded.to_dict(), handle)                     # OSError(ENOSPC), a one-line error
    return encoded


def encode_texts(examples: Examples, tokenizer, max_length: int) -> Encoded:
    ids, types, lengths = [], [], []
    for start in range(0, len(examples), CHUNK):
        pairs = examples.pairs[start:start + CHUNK] if examples.pairs is not None else None
        enc = tokenizer(examples.texts[start:start + CHUNK], pairs, truncation=True, max_length=max_length)
        ids.append(flat(enc["input_ids"]))
        lengths += map(len, enc["input_ids"])
        if "token_type_ids" in enc:
            types.append(flat(enc["token_type_ids"]))
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0, out=offsets[1:])
    labels = None
    if examples.labels is not None:
        labels = torch.tensor(examples.labels, dtype=torch.float32 if examples.task == "regression" else torch.long)
    return Encoded(examples.task, torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int32), offsets,
                   torch.cat(types) if types else None, labels, pad_id_of(tokenizer))


def encode_instructions(examples: Examples, tokenizer, max_length: int) -> Encoded:
    """Prompt then response (ending with EOS) end to end, with each example's prompt length."""
    from rosafx.recipes.data.instructions import token_rows
    ids, lengths, prompt_lengths, cut_prompts, cut_responses = [], [], [], 0, 0
    for rows, prompts_cut, responses_cut in token_rows(examples, tokenizer, max_length, CHUNK):
        ids.append(flat([prompt + response for prompt, response in rows]))
        lengths += [len(prompt) + len(response) for prompt, response in rows]
        prompt_lengths += [len(prompt) for prompt, _ in rows]
        cut_prompts, cut_responses = cut_prompts + prompts_cut, cut_responses + responses_cut
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0, out=offsets[1:])
    return Encoded(examples.task, torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int32), offsets, None, None,
                   pad_id_of(tokenizer), torch.tensor(prompt_lengths, dtype=torch.long), cut_prompts, cut_responses)


def from_cache(path: Path) -> Encoded | None:
    """The cached tokens, or None when the file is unreadable or not what this version writes
    (then they are tokenised again and the file replaced: a cache is never the only copy)."""
    try:
        encoded = Encoded(**{"token_type_ids": None, "labels": None, **torch.load(path, weights_only=True)})
        n = len(encoded)
        consistent = (encoded.offsets.dtype == torch.long and n >= 0 and int(encoded.offsets[0]) == 0
                      and int(encoded.offsets[-1]) == len(encoded.ids) and bool((encoded.lengths >= 0).all())
                      and (encoded.labels is None or len(encoded.labels) == n)
                      and (encoded.prompt_lengths is None or (len(encoded.prompt_lengths) == n
                                                              and bool((encoded.prompt_lengths <= encoded.lengths).all())))
                      and (encoded.token_type_ids is None or len(encoded.token_type_ids) == len(encoded.ids)))
    except Exception:  # noqa: BLE001  (damaged, truncated, foreign: all mean "tokenise again")
        return None
    return encoded if consistent else None


def flat(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.int32)
