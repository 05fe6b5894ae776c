"""moe_parallel: expert-parallel Mixture-of-Experts layers for DeepSpeed/Megatron-style clusters."""

from .aux_loss import attach_aux_loss, set_aux_loss_grad_scale
from .capacity import DispatchPlan, expert_capacity, plan_dispatch
from .config import MoEConfig, MoEConfigError
from .experts import GroupedExperts
from .layer import MoEInputError, MoELayer, MoEStats, moe_layers, update_expert_biases
from .router import TopKRouter

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
