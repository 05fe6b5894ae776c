"""Deprecated import path: ``moe_parallel.config`` is ``moe_parallel.core.config``."""

import sys
import warnings

from .core import config as _moved

warnings.warn(
    "moe_parallel.config moved to moe_parallel.core.config; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
