"""Adapted models under ``transformers.Trainer`` (and TRL's trainers built on it).

    trainer = Trainer(model=adapted, args=args, train_dataset=..., compute_loss_func=...,
                      callbacks=[RosafxCallback(adapted, loss_fn)])

``RosafxCallback`` runs each method's life cycle (rosafx/methods/base.py) at the Trainer's
events: ``before_training`` at ``on_train_begin`` (lora-ga's calibration on the first
``calibration_batches`` of the Trainer's train dataloader; a no-op on resume, when the
calibration is in the restored tensors), ``after_step`` at ``on_step_end`` with the
Trainer's optimizer (rosa's resample clears the factors' optimizer state there). At every
``on_save`` it writes the rosafx adapter (``rosafx.load`` reads it) and the life cycles'
state into ``checkpoint-N/rosafx/``; on resume the Trainer restores the model's state dict
and its optimizer; the callback then installs the adapter it saved there (a fresh model
lacks what a method added while training, such as lora-ga's calibrated base weight) and the
life cycles' state.

``loss_fn(model, batch)`` is the loss of ``rosafx.fit`` (calibration needs it); give the
Trainer the same loss as ``compute_loss_func``. A method that replaces Parameters while
training (rosa-robust's masks) is refused: the Trainer's optimizer (and a DeepSpeed/FSDP
wrapping of it) is not ours to rebuild; train rosa-robust with ``rosafx.fit``.
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from torch import fx
from transformers import TrainerCallback

from rosafx.errors import RosafxError
from rosafx.training.lifecycle import Lifecycles
from rosafx.methods.base import TrainingContext

ROSAFX_DIR, LIFECYCLE_STATE = "rosafx", "lifecycles.pt"


class RosafxCallback(TrainerCallback):
    def __init__(self, adapted: fx.GraphModule, loss_fn, *, calibration_batches: int = 8):
        self.adapted, self.loss_fn, self.calibration_batches = adapted, loss_fn, calibration_batches
        self.lifecycles = Lifecycles(adapted)
        self.ctx: TrainingContext | None = None

    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        device = next(self.adapted.parameters()).device
        loader = train_dataloader

        def calibration():
            if loader is None:
                raise RosafxError("The Trainer gave the callback no train dataloader to calibrate with.")
            return ({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    for batch in islice(iter(loader), self.calibration_batches))

        def refuse_rebuild():
            raise RosafxError("A method replaced a Parameter (rosa-robust's masks): the Trainer's optimizer cannot be "
                              "rebuilt from a callback. Train rosa-robust with rosafx.fit / rosafx train.")

        steps_per_epoch = None
        if loader is not None and hasattr(loader, "__len__"):
            steps_per_epoch = max(1, len(loader) // max(1, args.gradient_accumulation_steps))
        self.ctx = TrainingContext(model=self.adapted, optimizer=optimizer, loss_fn=self.loss_fn,
                                   step=state.global_step, total_steps=state.max_steps or None,
                                   steps_per_epoch=steps_per_epoch, calibration_batches=calibration,
                                   rebuild_optimizer=refuse_rebuild)
        if state.global_step > 0:
            self._resume(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        was_training = self.adapted.training
        self.adapted.train()
        self.lifecycles.before_training(self.ctx)
        self.adapted.train(was_training)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.ctx.step = state.global_step
        if optimizer is not None:
            self.ctx.optimizer = optimizer
        self.lifecycles.after_step(self.ctx)

    def on_save(self, args, state, control, **kwargs):
        from rosafx.io.atomic import atomic_directory
        from rosafx.pipeline.serialize import write_adapter
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not args.should_save or not checkpoint.is_dir():
            return
        with atomic_directory(checkpoint / ROSAFX_DIR) as tmp:
            write_adapter(self.adapted, tmp)
            torch.save(self.lifecycles.state_dict(), tmp / LIFECYCLE_STATE)

    def _resume(self, checkpoint: Path) -> None:
        """The Trainer loaded the module's state dict, but a fresh model has no buffer for what
        a method added while training (lora-ga's calibrated base weight): install the adapter
        the callback saved, in place (the optimizer keeps its Parameters), and the life cycles' state."""
        from safetensors.torch import load_file

        from rosafx.pipeline.serialize import TENSORS_NAME, install_tensors
        folder = checkpoint / ROSAFX_DIR
        if not (folder / LIFECYCLE_STATE).exists():
            raise RosafxError(f"{checkpoint} holds no rosafx state ({ROSAFX_DIR}/{LIFECYCLE_STATE}); resume from a "
                              "checkpoint written with RosafxCallback.")
        install_tensors(self.adapted, load_file(str(folder / TENSORS_NAME)))
        self.lifecycles.load_state_dict(torch.load(folder / LIFECYCLE_STATE, weights_only=True))


__all__ = ["RosafxCallback"]
