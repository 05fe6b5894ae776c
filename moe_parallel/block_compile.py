"""Deprecated import path: ``moe_parallel.block_compile`` is ``moe_parallel.training.block_compile``."""

import sys
import warnings

from .training import block_compile as _moved

warnings.warn(
    "moe_parallel.block_compile moved to moe_parallel.training.block_compile; "
    "the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
