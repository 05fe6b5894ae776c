"""Deprecated import path: ``moe_parallel.capacity`` is ``moe_parallel.core.capacity``."""

import sys
import warnings

from .core import capacity as _moved

warnings.warn(
    "moe_parallel.capacity moved to moe_parallel.core.capacity; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
