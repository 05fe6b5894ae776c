"""Deprecated import path: ``moe_parallel.expert_cost`` is ``moe_parallel.experts.choice``."""

import sys
import warnings

from .experts import choice as _moved

warnings.warn(
    "moe_parallel.expert_cost moved to moe_parallel.experts.choice; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
