"""Deprecated import path: ``moe_parallel.parallel`` is ``moe_parallel.integration.parallel``."""

import sys
import warnings

from .integration import parallel as _moved

warnings.warn(
    "moe_parallel.parallel moved to moe_parallel.integration.parallel; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
