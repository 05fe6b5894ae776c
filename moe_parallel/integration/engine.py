"""Build a DeepSpeed engine for a model that contains our MoE layers.

One function, :func:`build_engine`, does what every MoE user otherwise gets wrong by hand: it
checks the DeepSpeed config against the model (ZeRO-3 and fp16 are refused up front with the fix),
splits expert parameters into their own optimizer groups (so ZeRO partitions and reduces them over
the expert-data-parallel group), picks a fused optimizer where one exists, and keeps the aux-loss
gradient scaled like the main loss.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..core.aux_loss import set_aux_loss_grad_scale
from ..core.layer import moe_layers
from .deepspeed import mark_moe_layers, use_topology_free_checkpoints


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed config does not fit the model; the message names the key and the fix."""


def validate_deepspeed_config(ds_config: dict[str, Any], model: nn.Module) -> None:
    """Refuse configurations that cannot train this model correctly, before any collective."""
    has_moe = bool(moe_layers(model))
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if zero_stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"deepspeed.zero_optimization.stage={zero_stage!r}: choose 0, 1 or 2")
    if has_moe and zero_stage == 3:
        raise DeepSpeedConfigError(
            "deepspeed.zero_optimization.stage=3 cannot hold expert-parallel MoE layers (DeepSpeed partitions "
            "every parameter over all data-parallel ranks, but expert weights differ between EP ranks): "
            "use stage 1 or 2, which keep expert parameters in their own groups"
        )
    if has_moe and ds_config.get("fp16", {}).get("enabled", False):
        raise DeepSpeedConfigError(
            "deepspeed.fp16.enabled=true is not supported with MoE layers (the router and aux losses need "
            "the range of bf16/fp32, and dynamic loss scaling would have to reach the attached aux loss): "
            "use bf16.enabled=true on GPUs that support it, or fp32"
        )
    from ..experts.modules import ModuleExperts

    for layer in moe_layers(model):
        if isinstance(layer.experts, ModuleExperts):
            raise DeepSpeedConfigError(
                f"MoE layer {type(layer).__name__} holds module-copy experts (moe_parallel.compat.MoE with an "
                "expert no stacked form fits), which build_engine's topology-free checkpoints cannot store: "
                "build the engine with deepspeed.initialize (DeepSpeed's per-expert checkpoints), or give "
                "compat.MoE an expert with a stacked form (see docs/deepspeed.md)"
            )
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = ds_config.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DeepSpeedConfigError(f"deepspeed.{key}={value!r} must be a positive integer")


STACKED_BIASES = ("b1", "b2")  # the experts' per-expert biases (experts/stacked.py)


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for vectors (norms, biases, sinks) and the experts' stacked biases
    (``b1`` ``[e, 2F]``, ``b2`` ``[e, D]``: one bias vector per expert), and expert parameters split
    into DeepSpeed MoE groups (``moe=True``, named after their expert group)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_bias = param.dim() < 2 or name.rsplit(".", 1)[-1] in STACKED_BIASES
            (no_decay if is_bias else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def check_param_groups_agree(param_groups: list[dict[str, Any]], zero_stage: int, bf16: bool = False) -> None:
    """Under ZeRO 1/2, and with bf16 at ZeRO 0 (DeepSpeed's ``BF16_Optimizer``, which partitions
    likewise), DeepSpeed's gradient-norm step makes one collective per optimizer param group over the
    whole pipeline: ranks with different groups (a pipeline stage holding no MoE layer next to one
    that does) would wait for each other forever. Refuse that on every rank, before
    ``deepspeed.initialize``. One small all-gather of the group names."""
    import torch.distributed as dist

    if (zero_stage == 0 and not bf16) or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = tuple(group.get("name", "") for group in param_groups)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        kinds = sorted(set(every))
        ranks = {kind: [r for r, k in enumerate(every) if k == kind] for kind in kinds}
        detail = "; ".join(f"ranks {ranks[k]}: {list(k)}" for k in kinds)
        setting = f"deepspeed.zero_optimization.stage={zero_stage}" + (" with bf16" if bf16 and zero_stage == 0 else "")
        raise DeepSpeedConfigError(
            f"{setting} needs the same optimizer param groups on every rank, "
            f"but they differ ({detail}): a pipeline stage holds no MoE layer while another does, and "
            "DeepSpeed's gradient-norm step would hang. Use zero_optimization.stage=0 in fp32 for this layout, or "
            "choose parallel.pp / the layers' partition so that every stage holds at least one MoE layer"
        )


def make_optimizer(param_groups: list[dict[str, Any]], lr: float, betas=(0.9, 0.95), eps: float = 1e-8):
    """Apex's FusedAdam where a CUDA-built apex is importable, torch's AdamW otherwise (fused on GPU)."""
    if torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam  # NVIDIA Apex with CUDA extensions

            return FusedAdam(param_groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
        except ImportError:
            return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps)


def build_engine(
    model: nn.Module,
    ds_config: dict[str, Any],
    *,
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    lr_scheduler: Any = None,
):
    """``deepspeed.initialize`` for a model with MoE layers (a plain module or a ``PipelineModule``).

    Build the process groups first with :func:`moe_parallel.integration.parallel.initialize_parallel` and give
    the model's MoE layers ``state.ep_group``. Returns ``(engine, optimizer, lr_scheduler)``.
    """
    import deepspeed

    validate_deepspeed_config(ds_config, model)
    mark_moe_layers(model)  # layers built before DeepSpeed was imported
    config = copy.deepcopy(ds_config)
    config.pop("optimizer", None)  # the optimizer is built here, from param groups DeepSpeed needs
    config.setdefault("zero_allow_untested_optimizer", True)
    param_groups = optimizer_param_groups(model, weight_decay)
    check_param_groups_agree(
        param_groups,
        config.get("zero_optimization", {}).get("stage", 0),
        bf16=config.get("bf16", {}).get("enabled", False),
    )
    optimizer = make_optimizer(param_groups, lr=lr, betas=betas)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, lr_scheduler=lr_scheduler
    )
    # The main loss is divided by the accumulation steps in engine.backward; so is the aux loss.
    set_aux_loss_grad_scale(1.0 / engine.gradient_accumulation_steps())
    use_topology_free_checkpoints(engine)
    return engine, optimizer, scheduler
