"""Deprecated import path: ``moe_parallel.comm`` is ``moe_parallel.core.comm``."""

import sys
import warnings

from .core import comm as _moved

warnings.warn(
    "moe_parallel.comm moved to moe_parallel.core.comm; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
