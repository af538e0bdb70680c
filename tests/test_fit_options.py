"""rosafx/training/options.py: one typed definition of the training options. ``rosafx.fit``'s
signature holds exactly the table's names with its defaults, fit checks every setting against
it before anything runs, and the recipe's table (``rosafx train``, --config, run.json) takes
each shared option's type and bounds from it."""
import inspect
import math
import re

import pytest

from rosafx.errors import RosafxError
from rosafx.recipes.options import OPTIONS as RECIPE_OPTIONS
from rosafx.training.fit import fit
from rosafx.training.options import TRAINING_OPTIONS

# fit's keywords that are not settings: data, callables, where the run lives, how it reports
NOT_SETTINGS = {"eval_batches", "metrics", "optimizer", "run", "resume", "progress",
                "compile"}  # compile: also a backend name or a callable (the recipe's is a bool)
RECIPE_NAMES = {"max_steps": "steps"}  # the recipe's name -> the training option it is


def test_fits_signature_is_the_table():
    keywords = {name: p for name, p in inspect.signature(fit).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert set(keywords) - NOT_SETTINGS == set(TRAINING_OPTIONS)
    for name, option in TRAINING_OPTIONS.items():
        assert keywords[name].default == option.default, name


def test_the_recipe_takes_type_and_bounds_from_the_training_table():
    shared = {name: TRAINING_OPTIONS[RECIPE_NAMES.get(name, name)] for name in RECIPE_OPTIONS
              if RECIPE_NAMES.get(name, name) in TRAINING_OPTIONS}
    assert {"lr", "max_steps", "epochs", "seed", "grad_accum", "precision", "max_length"} <= set(shared)
    for name, option in shared.items():
        recipe = RECIPE_OPTIONS[name]
        assert (recipe.kind, recipe.low, recipe.high, recipe.low_open, recipe.high_open, recipe.choices) == \
            (option.kind, option.low, option.high, option.low_open, option.high_open, option.choices), name


@pytest.mark.parametrize("setting, message", [
    ({"lr": math.nan}, "rosafx.fit: lr must be a finite number in (0, 10]"),
    ({"grad_accum": 0}, "rosafx.fit: grad_accum must be an integer in [1, "),
    ({"precision": "fp16"}, "rosafx.fit: precision must be one of 'fp32', 'bf16'"),
    ({"warmup_ratio": 1.0}, "rosafx.fit: warmup_ratio must be a finite number in [0, 1)"),
    ({"steps": 2.5}, "rosafx.fit: steps must be an integer"),
    ({"log_every": 0}, "rosafx.fit: log_every must be an integer in"),
    ({"grad_checkpoint": "some"}, "rosafx.fit: grad_checkpoint must be one of 'full', 'attention', True, False"),
    ({"seed": True}, "rosafx.fit: seed must be an integer"),
])
def test_fit_refuses_a_bad_setting_before_anything_runs(setting, message):
    """The model, data and loss are never touched: the check comes first."""
    with pytest.raises(RosafxError, match=re.escape(message)):
        fit(None, None, None, **{"steps": 1, **setting})
