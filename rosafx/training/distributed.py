"""``rosafx.fit`` past one process: torchrun + DistributedDataParallel.

    torchrun --nproc_per_node 2 -m rosafx train MODEL ... -o RUN      (or rosafx train --nproc 2 ...)
    fit_distributed(adapted, train_batches, loss_fn, steps=..., run=RUN)  # in a torchrun script

What changes against one process, and where it lives (fit itself is unchanged):

* data: every rank walks the same global batches (same seed, same order) and keeps its
  contiguous slice of rows (``RankShard``), so the union of the ranks' batches is the
  single-process batch. A rank's loss is scaled by ``rows_rank · world / rows_global``:
  DDP averages the ranks' gradients, so the step's gradient is exactly the global batch's
  mean-over-examples gradient, uneven last batches included (a rank with no row runs one
  row at weight 0). For losses that average over tokens (causal-lm) it is the mean of the
  ranks' token means, as in every DDP trainer.
* gradients: the training forward goes through a ``DistributedDataParallel`` wrapper,
  rebuilt when a life cycle replaced a Parameter (rosa-robust's masks). Calibration and
  evaluation run on the bare model.
* life cycles: inside ``synchronised_life_cycles`` calibration averages each batch's
  weight gradient across ranks (so lora-ga's init and rosa-robust's masks see every rank's
  data), and the adapters a calibration or a rosa resample rewrote are broadcast from rank
  0 afterwards, so ranks stay bit-identical even where an SVD could differ across
  machines. Each rank clears its own optimizer state of resampled factors, as in one process.
* output: only rank 0 writes RUN (metrics, plot, checkpoints, adapter) and evaluates;
  every rank reads the checkpoint on resume. The loss rank 0 logs is its own slice's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import fx, nn

from rosafx.errors import RosafxError
from rosafx.methods.collectives import broadcast_adapters, mean_across_ranks, synchronised
from rosafx.training.runs import Run

SHARD_WEIGHT = "_rosafx_shard_weight"  # a batch key RankShard adds and DistributedLoss removes



@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def world() -> World:
    """This process's place: from the initialized process group, else one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_torchrun() -> World:
    """Join the process group torchrun set up (env://): nccl on CUDA, gloo on CPU."""
    if not launched_by_torchrun():
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if backend == "nccl" and torch.cuda.device_count() < per_node:
            raise RosafxError(f"torchrun started {per_node} processes on this node but it has "
                              f"{torch.cuda.device_count()} CUDA device(s): one process per GPU. Start at most "
                              f"{torch.cuda.device_count()} (--nproc), or train on CPU processes with "
                              "CUDA_VISIBLE_DEVICES='' (gloo).")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return world()


def leave() -> None:
    """Leave the process group (after training); nothing in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (creates RUN, writes caches), then the others."""
    here = world()
    if not here.is_main:
        barrier()
    yield
    if here.is_main:
        barrier()


# data ------------------------------------------------------------------------------------

class RankShard:
    """This rank's contiguous slice of each of ``batches`` (dicts of tensors with the
    example on dim 0). Same length, ``set_epoch`` passed on: a resumed position is the same
    global batch for every rank."""

    def __init__(self, batches: Iterable, rank: int, size: int):
        self.batches, self.rank, self.size = batches, rank, size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches:
            yield shard_batch(batch, self.rank, self.size)


def shard_batch(batch: dict, rank: int, size: int) -> dict:
    if not isinstance(batch, dict):
        raise RosafxError("Distributed training shards dict batches (name -> tensor, examples on dim 0); got "
                          f"{type(batch).__name__}. Shard the data yourself and pass shard=False.")
    rows = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(rows) != 1:
        raise RosafxError(f"The batch's tensors disagree on the number of examples ({sorted(rows)}).")
    total = rows.pop()
    bounds = [total * r // size for r in range(size + 1)]
    start, stop = bounds[rank], bounds[rank + 1]
    weight = (stop - start) * size / total
    if stop == start:  # fewer examples than ranks: a row that changes nothing keeps the collectives in step
        start, stop, weight = 0, 1, 0.0
    shard = {k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    shard[SHARD_WEIGHT] = torch.tensor(weight)
    return shard


# gradients -------------------------------------------------------------------------------

class DistributedLoss:
    """``loss_fn`` for fit under DDP: the training forward runs through a DDP wrapper of
    ``adapted`` (rebuilt when the trainable Parameters changed); calibration (the model is
    flagged ``_rosafx_calibrating``) and evaluation (eval mode) use the bare model. The
    rank's shard weight scales the loss."""

    def __init__(self, adapted: fx.GraphModule, loss_fn: Callable[[nn.Module, Any], torch.Tensor], device):
        self.adapted, self.loss_fn, self.device = adapted, loss_fn, device
        self._ddp, self._built_for = None, None

    def _trainable_key(self) -> tuple:
        return tuple((id(p), tuple(p.shape)) for p in self.adapted.parameters() if p.requires_grad)

    def ddp(self, module: nn.Module) -> nn.Module:
        """The DDP wrapper of ``module`` (the adapted model or its checkpointed training view)."""
        key = (id(module), self._trainable_key())
        if key != self._built_for:
            from torch.nn.parallel import DistributedDataParallel
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers (rosa's remainders, base weights) never change in a forward: no per-step broadcast
            self._ddp = DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
            self._built_for = key
        return self._ddp

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        from rosafx.training.activation_checkpointing import GradCheckpointed
        weight = None
        if isinstance(batch, dict) and SHARD_WEIGHT in batch:
            batch = dict(batch)
            weight = batch.pop(SHARD_WEIGHT)
        calibrating = getattr(self.adapted, "_rosafx_calibrating", False)
        ours = model is self.adapted or (isinstance(model, GradCheckpointed) and model.adapted is self.adapted)
        if model.training and not calibrating and not ours:
            # a wrapper of the model (a compiled module?) would train outside DDP, each rank on its own
            raise RosafxError(f"fit_distributed got a training forward through {type(model).__name__}, not the "
                              "adapted model: DDP cannot synchronise it. Train without that wrapper (compile) "
                              "under torchrun for now.")
        training = ours and self.adapted.training and not calibrating
        loss = self.loss_fn(self.ddp(model) if training else model, batch)
        return loss * weight.to(loss.device, loss.dtype) if weight is not None else loss


# life cycles -----------------------------------------------------------------------------

@contextlib.contextmanager
def synchronised_life_cycles():
    """Within it, calibration reduces gradients across ranks and rewritten adapters are
    broadcast from rank 0 (see rosafx/methods/collectives.py: ``mean_across_ranks``, ``broadcast_adapters``)."""
    with synchronised(world().size > 1):
        yield


# runs ------------------------------------------------------------------------------------

class ReadOnlyRun(Run):
    """RUN as ranks other than 0 see it: they read checkpoints (resume), write nothing."""

    def log(self, record: dict) -> None: ...

    def save_adapter(self, model, name: str = "adapter") -> None: ...

    def save_checkpoint(self, step: int, model, state: dict):
        return None

    def plot(self):
        return None

    def truncate_metrics(self, step: int) -> list[dict]:
        return [r for r in self.records() if r.get("step", 0) <= step]


def fit_distributed(adapted: fx.GraphModule, train_batches: Iterable, loss_fn, *, run=None,
                    eval_batches: Iterable | None = None, progress: bool = True, shard: bool = True, **fit_options):
    """``rosafx.fit`` on every rank of an initialized process group (torchrun): the same
    arguments, ``train_batches`` being the global batches (sharded here unless
    ``shard=False``). Every rank returns its History; only rank 0's has the evaluations."""
    from rosafx.training.fit import fit
    here = world()
    if here.size == 1:
        return fit(adapted, train_batches, loss_fn, run=run, eval_batches=eval_batches, progress=progress,
                   **fit_options)
    if run is not None and not isinstance(run, Run):
        run = Run(run) if here.is_main else ReadOnlyRun(run)
    elif isinstance(run, Run) and not here.is_main:
        run = ReadOnlyRun(run.path, run.keep_checkpoints)
    batches = RankShard(train_batches, here.rank, here.size) if shard else train_batches
    device = next((p.device for p in adapted.parameters() if p.requires_grad), here.device)
    with synchronised_life_cycles():
        history = fit(adapted, batches, DistributedLoss(adapted, loss_fn, device), run=run,
                      eval_batches=eval_batches if here.is_main else None, progress=progress and here.is_main,
                      **fit_options)
    barrier()  # rank 0 has written the adapter before anyone moves on
    return history


__all__ = ["World", "world", "init_from_torchrun", "leave", "launched_by_torchrun", "fit_distributed", "RankShard", "DistributedLoss",
           "synchronised_life_cycles", "mean_across_ranks", "broadcast_adapters", "ReadOnlyRun", "main_first"]
