"""Run by tests/test_fsdp.py under torchrun (2 CPU processes, gloo): trains the tiny
classifier of tests/test_fit.py with every layer fully_shard-ed (rosafx.training.fsdp) on this
rank's rows of each global batch, and writes the rank's adapter and what it holds of a
layer weight to OUT/rank<R>.safetensors."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import BATCHES, ROWS, STEPS, sgd  # noqa: E402
from test_fit import adapt, loss_fn, make_batches  # noqa: E402

from rosafx.training.distributed import SHARD_WEIGHT, init_from_torchrun, shard_batch  # noqa: E402
from rosafx.training.fsdp import average_replicated_gradients, shard_layers  # noqa: E402
from rosafx.pipeline.serialize import adapter_tensors  # noqa: E402

CONFIG = {"method": "lora", "rank": 4}
LAYER_WEIGHT = "bert.encoder.layer.0.intermediate.dense.weight"


def main(out: Path) -> None:
    torch.set_num_threads(1)
    here = init_from_torchrun()
    adapted = adapt(CONFIG)
    torch.manual_seed(0)
    adapted.train()
    structured = shard_layers(adapted)
    optimizer = sgd([p for p in adapted.parameters() if p.requires_grad])
    batches = make_batches(n=BATCHES, batch=ROWS)
    for step in range(STEPS):
        rows = shard_batch(batches[step % len(batches)], here.rank, here.size)
        weight = rows.pop(SHARD_WEIGHT)
        (loss_fn(structured, rows) * weight).backward()
        average_replicated_gradients(structured)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    held = structured.get_parameter(LAYER_WEIGHT)
    save_file({**{k: v.contiguous() for k, v in adapter_tensors(adapted).items()},
               "held_layer_weight": held.to_local().detach().contiguous(),
               "full_layer_weight": held.full_tensor().detach().contiguous()},
              str(out / f"rank{here.rank}.safetensors"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
