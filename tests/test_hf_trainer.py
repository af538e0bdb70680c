"""transformers.Trainer with RosafxCallback: lora, rosa (resampled twice) and lora-ga
(calibrated by the callback) train a few steps; a run resumed from the Trainer's
checkpoint-2 ends with the same adapter as the uninterrupted run (the reference), and the
checkpoint holds a rosafx adapter that rosafx.load reads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rosafx.training.hf_trainer import RosafxCallback
from rosafx.graph.adapted_graph import adapters_of
from rosafx.pipeline.serialize import adapter_tensors
from test_fit import VOCAB, adapt, loss_fn, tensors_close

CASES = {"lora": {"method": "lora", "rank": 4},
         "rosa": {"method": "rosa", "rank": 4, "resample_every": 2},
         "lora-ga": {"method": "lora-ga", "rank": 4}}


def dataset(n=16, seq=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (seq,), generator=g), "labels": int(torch.randint(0, 2, (), generator=g))}
            for _ in range(n)]


def trainer_loss(outputs, labels, num_items_in_batch=None):
    return F.cross_entropy(outputs.logits, labels)


def train(config, out, resume=False, max_steps=4):
    from transformers import Trainer, TrainingArguments
    adapted = adapt(config)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="steps", save_steps=2, logging_steps=100,
                             report_to=[], use_cpu=True, remove_unused_columns=False, seed=0, disable_tqdm=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=adapted, args=args, train_dataset=dataset(), compute_loss_func=trainer_loss,
                      callbacks=[RosafxCallback(adapted, loss_fn, calibration_batches=2)])
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2") if resume else None)
    return adapted


@pytest.mark.parametrize("name", list(CASES))
def test_trainer_runs_the_life_cycle_and_resumes(tmp_path, name):
    whole = train(CASES[name], tmp_path / "whole")
    first = adapt(CASES[name])
    reference = adapter_tensors(first)
    trained = adapter_tensors(whole)
    moved = [k for k in trained if "lora_B" in k and not torch.equal(trained[k], reference[k])]
    assert moved, "training changed nothing"
    sites = [a for a in adapters_of(whole).values()]
    if name == "rosa":
        assert all(int(a.resamples) == 2 for a in sites)
    if name == "lora-ga":
        assert all(bool(a.calibrated) for a in sites)
    # cut after step 2 and resume from the Trainer's checkpoint
    train(CASES[name], tmp_path / "cut", max_steps=2)
    assert (tmp_path / "cut" / "checkpoint-2" / "rosafx" / "rosafx.json").exists()
    resumed = train(CASES[name], tmp_path / "cut", resume=True)
    tensors_close(adapter_tensors(resumed), trained, rel=1e-6)
