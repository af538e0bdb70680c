"""rosafx: capture a model as an FX graph, insert adapters by rules, train, merge, export.

    adapted = rosafx.transform(model, {"query": {"method": "lora", "rank": 8}})
    history = rosafx.fit(adapted, batches, loss_fn, steps=500)   # or your own loop
    plain = rosafx.merge(adapted)
    rosafx.export_onnx(adapted, "model.onnx")
"""
from rosafx import ops  # noqa: F401  (registers the rosafx:: ops)
from rosafx.api import (act, bank, calibrate, export_onnx, fuse_siblings, load, lower, merge, methods, resample, save, to_device,
                        transform, unbank)
from rosafx.errors import RosafxError
from rosafx.training.fit import evaluate, fit

__all__ = ["transform", "merge", "export_onnx", "save", "load", "methods", "calibrate", "lower",
           "resample", "act", "fuse_siblings", "to_device", "bank", "unbank", "fit", "evaluate", "RosafxError"]
__version__ = "0.1.0"
