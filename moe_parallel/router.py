"""Deprecated import path: ``moe_parallel.router`` is ``moe_parallel.core.router``."""

import sys
import warnings

from .core import router as _moved

warnings.warn(
    "moe_parallel.router moved to moe_parallel.core.router; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
