"""Deprecated import path: ``moe_parallel.checkpoint_migrate`` is ``moe_parallel.checkpoints.migrate``."""

import sys
import warnings

from .checkpoints import migrate as _moved

warnings.warn(
    "moe_parallel.checkpoint_migrate moved to moe_parallel.checkpoints.migrate; "
    "the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
