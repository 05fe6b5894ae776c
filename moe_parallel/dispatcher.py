"""Deprecated import path: ``moe_parallel.dispatcher`` is ``moe_parallel.core.dispatcher``."""

import sys
import warnings

from .core import dispatcher as _moved

warnings.warn(
    "moe_parallel.dispatcher moved to moe_parallel.core.dispatcher; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
