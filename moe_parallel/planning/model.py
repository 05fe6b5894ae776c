"""What one rank holds, built by the model code itself on the meta device (no memory, no weights).

A plan never re-derives a model's shapes from a formula: it builds the same modules training builds
(``GPT`` / ``Decoder`` at PP = 1, the pipeline's ``LayerSpec`` list cut at DeepSpeed's stage
boundaries at PP > 1) on the meta device, then keeps each MoE layer's share of the experts, the
slice that an expert-parallel rank builds. Every rank of a stage holds the same shapes (EP ranks
differ only in which experts they hold), so a stage is described by one :class:`StageModel`.

Shape suffixes as elsewhere: E experts, e = E / EP local experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.layer import MoELayer, moe_layers
from ..integration.deepspeed import expert_group_name
from ..integration.pipeline import DECODER_PIPELINE, GPT_PIPELINE, PipelineFamily
from ..models.decoder import Decoder, DecoderConfig
from ..models.gpt import GPT, GPTConfig

ModelConfig = GPTConfig | DecoderConfig


def pipeline_family(config: ModelConfig) -> PipelineFamily:
    """The pipeline plumbing of ``config``'s model family."""
    return DECODER_PIPELINE if isinstance(config, DecoderConfig) else GPT_PIPELINE


def plain_model_class(config: ModelConfig) -> type[nn.Module]:
    return Decoder if isinstance(config, DecoderConfig) else GPT


@dataclass
class StageModel:
    """One pipeline stage as its ranks build it, on the meta device.

    ``module`` holds the parameters the engine sees (the plain model at PP = 1; at PP > 1 the
    stage's layers and tied modules, as DeepSpeed's ``PipelineModule`` registers them);
    ``forward_funcs`` is the stage's forward in order (the plain model alone at PP = 1), with
    ``loss_fn`` applied to the last stage's output.
    """

    stage: int
    num_stages: int
    module: nn.Module
    forward_funcs: list[Callable]
    loss_fn: Callable | None
    layer_range: tuple[int, int]  # [start, stop) in the pipeline's layer list (PP > 1)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


def build_stage(config: ModelConfig, num_stages: int, stage: int, ep: int = 1) -> StageModel:
    """Stage ``stage`` of ``num_stages`` on the meta device, holding ``E / ep`` experts per MoE layer.

    With ``ep > 1`` the stage cannot run (its MoE layers have no expert-parallel group); it is for
    counting what a rank holds. Build with ``ep=1`` to trace a forward.
    """
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage={stage} is outside 0..{num_stages - 1}")
    with torch.device("meta"), _NoInitOnMeta():
        if num_stages == 1:
            model = plain_model_class(config)(config)
            stage_model = StageModel(0, 1, model, [model], None, (0, 1))
        else:
            stage_model = _pipeline_stage(config, num_stages, stage)
    if ep > 1:
        for layer in moe_layers(stage_model.module):
            keep_local_experts(layer, ep)
    return stage_model


class _NoInitOnMeta(TorchFunctionMode):
    """Skips the in-place initialisers on meta tensors: they have no values to fill, and each call
    still costs a trip through torch's reference implementations (most of a large model's build)."""

    _FILLS = frozenset(
        getattr(torch.Tensor, name)
        for name in ("normal_", "uniform_", "zero_", "fill_", "copy_", "trunc_normal_")
        if hasattr(torch.Tensor, name)
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._FILLS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def _pipeline_stage(config: ModelConfig, num_stages: int, stage: int) -> StageModel:
    """What ``PipelineModule._build`` builds on one stage: its layers, each tied module once."""
    family = pipeline_family(config)
    module, funcs, layer_range = family.stage_layers(config, num_stages, stage)
    loss_fn = family.loss_fn if stage == num_stages - 1 else None
    return StageModel(stage, num_stages, module, funcs, loss_fn, layer_range)


def keep_local_experts(layer: MoELayer, ep: int) -> None:
    """Cut a meta-device MoE layer built with all experts down to one EP rank's ``E / ep``.

    The stacked expert parameters keep their leading ``e`` rows and DeepSpeed's expert marks
    (``allreduce=False``, the group name of this EP size), as ``MoELayer(..., ep_size=ep)`` marks them.
    """
    if layer.num_experts % ep:
        raise ValueError(f"num_experts={layer.num_experts} is not divisible by ep={ep}")
    local = layer.num_experts // ep
    name = expert_group_name(ep)
    for module in layer.experts.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            cut = nn.Parameter(param[:local], requires_grad=param.requires_grad)
            cut.allreduce = False
            cut.group_name = name
            setattr(module, pname, cut)
    layer.experts.num_local_experts = local
    layer.num_local_experts = local
    layer.ep_size = ep
    layer.expert_group_name = name


def is_expert_param(param: nn.Parameter) -> bool:
    """An expert-parallel parameter: DeepSpeed reduces it over the expert-data-parallel group."""
    return getattr(param, "allreduce", True) is False


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
