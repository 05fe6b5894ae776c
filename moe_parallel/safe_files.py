"""Deprecated import path: ``moe_parallel.safe_files`` is ``moe_parallel.checkpoints.safe_files``."""

import sys
import warnings

from .checkpoints import safe_files as _moved

warnings.warn(
    "moe_parallel.safe_files moved to moe_parallel.checkpoints.safe_files; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
