"""Deprecated import path: ``moe_parallel.cpu_buffers`` is ``moe_parallel.experts.buffers``."""

import sys
import warnings

from .experts import buffers as _moved

warnings.warn(
    "moe_parallel.cpu_buffers moved to moe_parallel.experts.buffers; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
