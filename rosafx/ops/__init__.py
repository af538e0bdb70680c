"""Registered adapter ops (``torch.library``): one opaque node each under torch.export.

Each op has a torch reference implementation (CPU and any device), a fake (meta)
implementation for export, and an autograd formula. ``rosafx.lower`` may swap in Triton.
"""
from . import lowrank  # noqa: F401  (registers rosafx::lowrank_linear)
from . import sparse  # noqa: F401  (registers rosafx::sparse_lowrank_linear)
from . import vera  # noqa: F401  (registers rosafx::vera_linear, vera_linear_given_h)
from . import siblings  # noqa: F401  (registers the sibling-fusion ops)
