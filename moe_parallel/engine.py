"""Deprecated import path: ``moe_parallel.engine`` is ``moe_parallel.integration.engine``."""

import sys
import warnings

from .integration import engine as _moved

warnings.warn(
    "moe_parallel.engine moved to moe_parallel.integration.engine; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
