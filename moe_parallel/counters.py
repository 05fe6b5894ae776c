"""Deprecated import path: ``moe_parallel.counters`` is ``moe_parallel.core.counters``."""

import sys
import warnings

from .core import counters as _moved

warnings.warn(
    "moe_parallel.counters moved to moe_parallel.core.counters; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
