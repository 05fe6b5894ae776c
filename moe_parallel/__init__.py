"""moe_parallel: expert-parallel Mixture-of-Experts layers for DeepSpeed/Megatron-style clusters."""

from .core.aux_loss import attach_aux_loss, set_aux_loss_grad_scale
from .core.capacity import DispatchPlan, expert_capacity, plan_dispatch
from .core.config import MoEConfig, MoEConfigError
from .core.layer import MoEInputError, MoELayer, MoEStats, moe_layers, update_expert_biases
from .core.router import TopKRouter
from .experts import GroupedExperts

__all__ = [
    "DispatchPlan",
    "GroupedExperts",
    "MoEConfig",
    "MoEConfigError",
    "MoEInputError",
    "MoELayer",
    "MoEStats",
    "TopKRouter",
    "attach_aux_loss",
    "expert_capacity",
    "moe_layers",
    "plan_dispatch",
    "set_aux_loss_grad_scale",
    "update_expert_biases",
]

__version__ = "0.1.0"
