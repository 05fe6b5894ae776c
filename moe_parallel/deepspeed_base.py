"""Make DeepSpeed's engine treat our layers as MoE layers.

DeepSpeed decides whether a model has MoE layers (and so whether ZeRO keeps expert parameters
apart and reduces them over the expert-data-parallel group) with ``isinstance(module,
deepspeed.moe.layer.MoE)``. Our layers inherit that class only as a marker: none of DeepSpeed's MoE
machinery is built or called.
"""

from __future__ import annotations

from torch import nn

try:
    from deepspeed.moe.layer import MoE as _DeepSpeedMoE
except ImportError:  # DeepSpeed is optional for the layer itself
    _DeepSpeedMoE = nn.Module


class DeepSpeedRecognizedMoE(_DeepSpeedMoE):
    """Marker base class. Subclasses set ``num_experts``, ``ep_size``, ``num_local_experts``,
    ``expert_group_name`` and ``ep_group`` (the attributes DeepSpeed reads)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)  # deliberately not DeepSpeed's MoE.__init__

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, **_: object) -> None:
        """Called by ``deepspeed.initialize``: check that DeepSpeed reduces our experts over our groups."""
        from deepspeed.utils import groups

        name = self.expert_group_name
        registered = groups._get_expert_parallel_group_dict()
        if name not in registered:
            if self.ep_size > 1:
                raise RuntimeError(
                    f"expert-parallel group '{name}' is not registered with DeepSpeed: build the groups with "
                    "moe_parallel.parallel.initialize_parallel(pp, ep) before creating the model"
                )
            groups._create_expert_and_data_parallel(1)
        elif self.ep_size > 1 and registered[name] is not self.ep_group:
            raise RuntimeError(
                f"DeepSpeed's expert-parallel group '{name}' is not the group this layer all-to-alls over: "
                "pass ParallelState.ep_group from moe_parallel.parallel.initialize_parallel to the layer"
            )
