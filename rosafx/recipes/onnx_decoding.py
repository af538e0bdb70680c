"""Greedy decoding in onnxruntime over a decoder ONNX with the KV cache
(``decoder_io.py`` names its inputs and outputs): the prompt is fed once, then each new
token is one call on that one token with the previous call's presents as pasts."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rosafx.errors import RosafxError
from rosafx.recipes.decoder_io import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, CacheLayout, past_name

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


@dataclass
class DecoderState:
    """What the next call needs: the cache and how many tokens it holds."""
    past: dict[str, np.ndarray]
    length: int = 0


@dataclass
class OnnxDecoder:
    path: Path
    fed: list[int] = field(default_factory=list)  # tokens fed per call (the prompt, then 1 each)

    def __post_init__(self):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001  (onnxruntime raises its own types for every kind of bad file)
            raise RosafxError(f"{self.path} is not a model onnxruntime can load "
                              f"({(str(exc).splitlines() or [''])[0][:200]}).") from None
        self.layout = self._layout()

    def _layout(self) -> CacheLayout:
        inputs = {i.name: i for i in self.session.get_inputs()}
        layers = sorted({int(m.group(1)) for name in inputs if (m := _PAST.match(name))})
        if not layers or {INPUT_IDS, ATTENTION_MASK, POSITION_IDS} - set(inputs) or layers != list(range(len(layers))):
            raise RosafxError(f"{self.path} is not a decoder with KV-cache inputs (input_ids, attention_mask, "
                              "position_ids, past_key_values.N.key/value); `rosafx export RUN --merge` writes one "
                              "for a causal-lm run.")
        shape = inputs[past_name(0, "key")].shape
        if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
            raise RosafxError(f"{self.path}: the past key/value inputs need fixed head counts and sizes, got {shape}.")
        return CacheLayout(len(layers), shape[1], shape[3])

    def empty_state(self, batch: int = 1) -> DecoderState:
        return DecoderState(self.layout.empty(batch))

    def step(self, ids: np.ndarray, state: DecoderState) -> tuple[np.ndarray, DecoderState]:
        """Logits of ``ids`` (batch, new) given the cache; returns the grown cache."""
        batch, new = ids.shape
        total = state.length + new
        feed = {INPUT_IDS: ids.astype(np.int64), ATTENTION_MASK: np.ones((batch, total), np.int64),
                POSITION_IDS: np.broadcast_to(np.arange(state.length, total, dtype=np.int64), (batch, new)).copy(),
                **state.past}
        logits, *present = self.session.run(None, feed)
        self.fed.append(new)
        return logits, DecoderState(dict(zip(self.layout.names(), present)), total)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int] = frozenset()) -> list[int]:
        """New token ids (the prompt excluded); stops after an EOS token, which is kept, as
        transformers' generate does."""
        out: list[int] = []
        ids, state = np.asarray([prompt_ids], dtype=np.int64), self.empty_state(1)
        for _ in range(max_new_tokens):
            logits, state = self.step(ids, state)
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token in eos_ids:
                break
            ids = np.asarray([[token]], dtype=np.int64)
        return out
