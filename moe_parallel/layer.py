"""Deprecated import path: ``moe_parallel.layer`` is ``moe_parallel.core.layer``."""

import sys
import warnings

from .core import layer as _moved

warnings.warn(
    "moe_parallel.layer moved to moe_parallel.core.layer; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
