"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): trains the tiny
classifier of tests/test_fit.py with rosafx.training.distributed.fit_distributed and writes each
rank's adapter to OUT/<method>-rank<R>.safetensors."""
import contextlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_fit import adapt, loss_fn, make_batches  # noqa: E402

from rosafx.training.distributed import fit_distributed, init_from_torchrun  # noqa: E402
from rosafx.methods.lora_ga import LoraGaAdapter  # noqa: E402
from rosafx.pipeline.serialize import adapter_tensors  # noqa: E402

CASES = {"lora": {"method": "lora", "rank": 4},
         "rosa": {"method": "rosa", "rank": 4, "resample_every": 2},
         "lora-ga": {"method": "lora-ga", "rank": 4},
         "lora-checkpointed": {"method": "lora", "rank": 4}}
CHECKPOINTED = {"lora-checkpointed"}  # trained with grad_checkpoint=True under DDP (DDP wraps the view)
STEPS, BATCHES, ROWS = 5, 4, 5  # 5 rows: the ranks get 2 and 3, so the shard weights matter


def sgd(params):
    """SGD with momentum: linear in the gradients, so the ranks' summation order stays at fp32
    rounding (Adam's m/√v turns a rounding difference in a near-zero gradient into a full
    step); momentum is the optimizer state rosa's resample must clear on every rank."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


@contextlib.contextmanager
def lora_ga_mean_gradients():
    """Record the mean calibration gradient each lora-ga site ends with (site path -> out x in).
    lora-ga's init (the singular vectors r..2r of that gradient) is ill-conditioned on a
    model this small, so the test compares the gradient itself against one process."""
    seen, original = {}, LoraGaAdapter.end_calibration

    def end_calibration(self, num_batches, base_weight):
        seen[self.site_path] = (self._grad_sum / num_batches).clone()
        return original(self, num_batches, base_weight)
    LoraGaAdapter.end_calibration = end_calibration
    try:
        yield seen
    finally:
        LoraGaAdapter.end_calibration = original


def main(out: Path) -> None:
    """lora-ga's svd_lowrank draws from the RNG: the same seed= as the single-process run."""
    torch.set_num_threads(1)
    here = init_from_torchrun()
    for name, config in CASES.items():
        adapted = adapt(config)
        with lora_ga_mean_gradients() as gradients:
            fit_distributed(adapted, make_batches(n=BATCHES, batch=ROWS), loss_fn, steps=STEPS, optimizer=sgd,
                            schedule="constant", progress=False, calibration_batches=2, seed=0,
                            grad_checkpoint=name in CHECKPOINTED)
        if gradients:
            save_file(gradients, str(out / f"{name}-gradients-rank{here.rank}.safetensors"))
        save_file({k: v.contiguous() for k, v in adapter_tensors(adapted).items()},
                  str(out / f"{name}-rank{here.rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
