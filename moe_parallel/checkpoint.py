"""Deprecated import path: ``moe_parallel.checkpoint`` is ``moe_parallel.checkpoints.checkpoint``."""

import sys
import warnings

from .checkpoints import checkpoint as _moved

warnings.warn(
    "moe_parallel.checkpoint moved to moe_parallel.checkpoints.checkpoint; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
