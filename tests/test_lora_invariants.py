"""The invariant matrix for LoRA: every tiny model x every invariant."""
import pytest

from invariants import ALL, Case, run_check
from models import ZOO

LORA = {"method": "lora", "rank": 4, "alpha": 8}
RULES = {
    "bert": {"query": LORA, "value": LORA, "dense": LORA},
    "gpt2": {"c_attn": LORA, "c_proj": LORA, "lm_head": LORA},   # Conv1D + the tied head
    "llama": {"q_proj": LORA, "k_proj": LORA, "v_proj": LORA, "down_proj": LORA},
    "functional": {"proj": LORA, "out": LORA},
    "called_twice": {"shared": LORA},
}


@pytest.mark.parametrize("invariant", sorted(ALL))
@pytest.mark.parametrize("model", sorted(ZOO))
def test_lora_invariant(model, invariant, tmp_path):
    run_check(invariant, Case(ZOO[model], RULES[model]), tmp_path)
