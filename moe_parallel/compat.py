"""DeepSpeed drop-in: ``from moe_parallel.compat import MoE`` (a public, documented import path).

``MoE`` takes ``deepspeed.moe.layer.MoE``'s constructor arguments; the implementation lives in
:mod:`moe_parallel.integration.compat`. This module only re-exports it (no deprecation: it is the
drop-in's name).
"""

from .integration.compat import MoE, MoECompatError, OptimizerLayoutWarning

__all__ = ["MoE", "MoECompatError", "OptimizerLayoutWarning"]
