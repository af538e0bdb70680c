"""The inputs and outputs of a decoder ONNX with the KV cache (decoder_export.py writes it,
onnx_decoding.py runs it): their names, and the shape of the cache per layer."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class CacheLayout:
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "CacheLayout":
        text = config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.num_hidden_layers, kv_heads, head_dim)

    def names(self, kinds=("key", "value"), name=past_name) -> list[str]:
        return [name(i, kind) for i in range(self.layers) for kind in kinds]

    def empty(self, batch: int, dtype=np.float32) -> dict[str, np.ndarray]:
        """Past tensors of length 0: the prompt call."""
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype) for n in self.names()}
