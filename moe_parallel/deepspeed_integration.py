"""Deprecated import path: ``moe_parallel.deepspeed_integration`` is ``moe_parallel.integration.deepspeed``."""

import sys
import warnings

from .integration import deepspeed as _moved

warnings.warn(
    "moe_parallel.deepspeed_integration moved to moe_parallel.integration.deepspeed; "
    "the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
