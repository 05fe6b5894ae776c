"""Deprecated import path: ``moe_parallel.module_experts`` is ``moe_parallel.experts.modules``."""

import sys
import warnings

from .experts import modules as _moved

warnings.warn(
    "moe_parallel.module_experts moved to moe_parallel.experts.modules; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
