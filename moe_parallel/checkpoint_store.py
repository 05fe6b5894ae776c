"""Deprecated import path: ``moe_parallel.checkpoint_store`` is ``moe_parallel.checkpoints.store``."""

import sys
import warnings

from .checkpoints import store as _moved

warnings.warn(
    "moe_parallel.checkpoint_store moved to moe_parallel.checkpoints.store; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
