"""Deprecated import path: ``moe_parallel.aux_loss`` is ``moe_parallel.core.aux_loss``."""

import sys
import warnings

from .core import aux_loss as _moved

warnings.warn(
    "moe_parallel.aux_loss moved to moe_parallel.core.aux_loss; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
