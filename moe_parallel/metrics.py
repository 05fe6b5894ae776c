"""Deprecated import path: ``moe_parallel.metrics`` is ``moe_parallel.training.metrics``."""

import sys
import warnings

from .training import metrics as _moved

warnings.warn(
    "moe_parallel.metrics moved to moe_parallel.training.metrics; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
