"""The models as DeepSpeed pipelines: ``gpt_pipeline`` and ``decoder_pipeline`` (``deepspeed.pipe.PipelineModule``).

A family's pipeline is its plain model (:mod:`moe_parallel.models`) cut into a flat list of layers:
the token embedding first, optional per-family layers, ``blocks.0 .. blocks.{L-1}``, then
``final_norm``, optional layers (the decoder's multi-token prediction) and ``lm_head``. Pipeline layer
``idx`` holds the plain model's parameters under prefix ``layer_names[idx]``; DeepSpeed names them
``f"{idx}.{rest}"``, except a tied embedding, which it names ``tied_modules.embed.{rest}`` (the tied
LM head, last, then has no parameters of its own). The embedding is tied when the head is
(``tie_embeddings``) and also when the last stage needs it for multi-token prediction
(``mtp_layers > 0``): see :func:`embedding_is_tied`. :class:`PipelineFamily` says what differs between
families (names, block class, error class); everything else lives here once.

DeepSpeed is imported when a pipeline, its ``LayerSpec`` list or its partition is built, never at import.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

from ..core.comm import ProcessGroup
from ..models.decoder import DecoderBlock, DecoderConfig, DecoderConfigError, decoder_layer_names
from ..models.decoder import FinalNorm as DecoderFinalNorm
from ..models.gpt import (
    FinalNorm,
    GPTConfig,
    GPTConfigError,
    LMHead,
    PositionEmbedding,
    TokenEmbedding,
    TransformerBlock,
    lm_loss,
    pipeline_layer_names,
)
from ..models.mtp import MTPLoss, MTPStack

if TYPE_CHECKING:  # deepspeed is imported lazily: it is slow to import and the plain models do not need it
    from deepspeed.pipe import PipelineModule, ProcessTopology

TIED_EMBEDDING_KEY = "embed"  # TiedLayerSpec key: the pipeline names the tied module tied_modules.embed
_PLAIN_KEY = re.compile(r"(blocks\.\d+|[a-z_]+)\.(.+)")


class PipelineConfig(Protocol):
    """What the plumbing reads from a model config (and ``mtp_layers`` where the family has it)."""

    num_layers: int
    tie_embeddings: bool


def embedding_is_tied(config: PipelineConfig) -> bool:
    """Whether the pipeline holds the embedding as a DeepSpeed tied module (``tied_modules.embed``):
    with a tied LM head, and with multi-token prediction, whose modules on the last stage embed tokens."""
    return config.tie_embeddings or getattr(config, "mtp_layers", 0) > 0


@functools.lru_cache(maxsize=1024)
def _balanced_parts(weights: tuple[int, ...], num_stages: int) -> tuple[int, ...]:
    """DeepSpeed's balanced partition (a search over boundaries: worth keeping for planners, which
    ask for the same model's stages many times)."""
    from deepspeed.runtime.utils import partition_balanced

    return tuple(int(p) for p in partition_balanced(list(weights), num_stages))


@dataclass(frozen=True)
class PipelineFamily:
    """One model family's pipeline: what differs between families, and the shared operations.

    ``model``: the plain module's class name (error messages); ``builder``: the public builder's
    name (error messages); ``block``: the transformer-block class name, which DeepSpeed partitions
    over (``type:<block>``) and recomputes under activation checkpointing; ``error``: the family's
    config error class; ``layer_names(config)``: plain-model prefix of each pipeline layer;
    ``layer_specs(config, ep_group)``: the ``LayerSpec`` list in that order; ``loss_fn``: the
    pipeline's loss.
    """

    model: str
    builder: str
    block: str
    error: type[ValueError]
    layer_names: Callable[[Any], list[str]]
    layer_specs: Callable[[Any, ProcessGroup | None], list]
    loss_fn: Callable

    @property
    def partition_method(self) -> str:
        return f"type:{self.block}"

    def plain_to_pipeline(self, state_dict: dict[str, Any], config: PipelineConfig) -> dict[str, Any]:
        """Rename a plain-model state dict to the pipeline's names (all stages together).

        A stage holds the subset of keys its ``state_dict()`` lists; with tied embeddings the first
        and the last stage both hold ``tied_modules.embed.weight``.
        """
        prefixes = {name: str(idx) for idx, name in enumerate(self.layer_names(config))}
        if embedding_is_tied(config):
            prefixes["embed"] = f"tied_modules.{TIED_EMBEDDING_KEY}"
        if config.tie_embeddings:
            del prefixes["lm_head"]  # the tied head is the embedding: the plain model has no lm_head parameters
        out: dict[str, Any] = {}
        for key, value in state_dict.items():
            match = _PLAIN_KEY.match(key)
            if match is None or match.group(1) not in prefixes:
                raise KeyError(f"{key!r} is not a parameter name of {self.model}({config.num_layers} layers)")
            out[f"{prefixes[match.group(1)]}.{match.group(2)}"] = value
        return out

    def pipeline_to_plain(self, state_dict: dict[str, Any], config: PipelineConfig) -> dict[str, Any]:
        """Inverse of :meth:`plain_to_pipeline` (for one stage's or all stages' keys)."""
        names = self.layer_names(config)
        tied = f"tied_modules.{TIED_EMBEDDING_KEY}."
        out: dict[str, Any] = {}
        for key, value in state_dict.items():
            if embedding_is_tied(config) and key.startswith(tied):
                out[f"embed.{key[len(tied) :]}"] = value
                continue
            idx, _, rest = key.partition(".")
            if not idx.isdigit() or int(idx) >= len(names) or not rest:
                raise KeyError(f"{key!r} is not a parameter name of {self.builder}({config.num_layers} layers)")
            out[f"{names[int(idx)]}.{rest}"] = value
        return out

    def parts(self, config: PipelineConfig, num_stages: int) -> list[int]:
        """Stage boundaries: stage s builds pipeline layers ``parts[s] <= idx < parts[s+1]``.

        The same computation as DeepSpeed's ``partition_method="type:<block>"``: blocks are balanced
        over the stages (each stage gets at least one), the layers before the blocks go to the first
        stage and those after to the last. Depends only on the layer names and ``num_stages``.
        """
        if not isinstance(num_stages, int) or not 1 <= num_stages <= config.num_layers:
            raise self.error(
                f"num_stages={num_stages!r} is invalid: every pipeline stage needs at least one block, so use "
                f"1 <= num_stages <= model.num_layers={config.num_layers}"
            )
        weights = tuple(int(name.startswith("blocks.")) for name in self.layer_names(config))
        return list(_balanced_parts(weights, num_stages))

    def build(
        self,
        config: PipelineConfig,
        num_stages: int | None,
        ep_group: ProcessGroup | None,
        topology: ProcessTopology | None,
        activation_checkpoint_interval: int,
        **pipeline_kwargs: Any,
    ) -> PipelineModule:
        """The ``deepspeed.pipe.PipelineModule`` (see the families' builders for the contract).

        Every check runs before DeepSpeed starts a collective; the partition DeepSpeed computes is
        checked against :meth:`parts`, and ``module.canonical_parameter_names()`` maps this stage's
        parameter names to the plain model's (what checkpoints store).
        """
        import deepspeed
        import deepspeed.comm as ds_dist
        import torch.distributed as dist
        from deepspeed.pipe import PipelineModule

        if topology is not None:
            if num_stages is not None and num_stages != topology.get_dim("pipe"):
                raise self.error(
                    f"num_stages={num_stages} disagrees with the topology's pipe size {topology.get_dim('pipe')}: "
                    "give one of them"
                )
            num_stages = topology.get_dim("pipe")
        if num_stages is None:
            raise self.error(f"{self.builder} needs num_stages or a topology with a 'pipe' axis")
        parts = self.parts(config, num_stages)
        if not dist.is_initialized():
            raise RuntimeError(
                f"{self.builder} needs torch.distributed: launch with deepspeed/torchrun and call "
                f"deepspeed.init_distributed() first (use {self.model} for a single process)"
            )
        if "LOCAL_RANK" not in os.environ:
            raise RuntimeError(f"{self.builder} needs LOCAL_RANK in the environment (the deepspeed launcher sets it)")
        if not ds_dist.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing process group

        pipeline_kwargs.setdefault("checkpointable_layers", [self.block])
        module = PipelineModule(
            layers=self.layer_specs(config, ep_group),
            num_stages=None if topology is not None else num_stages,
            topology=topology,
            loss_fn=self.loss_fn,
            partition_method=self.partition_method,
            activation_checkpoint_interval=activation_checkpoint_interval,
            **pipeline_kwargs,
        )
        if [int(p) for p in module.parts] != parts:  # a DeepSpeed change would silently move layers
            raise RuntimeError(f"DeepSpeed partitioned the layers as {module.parts}, expected {parts}")
        # Checkpoints store parameters under the plain model's names, whatever the stage layout.
        module.canonical_parameter_names = lambda: self.canonical_names(module, config)
        return module

    def stage_layers(
        self, config: PipelineConfig, num_stages: int, stage: int
    ) -> tuple[nn.Module, list[Callable], tuple[int, int]]:
        """What ``PipelineModule._build`` builds on stage ``stage``, without DeepSpeed's process groups:
        ``(module, forward_funcs, (start, stop))``. ``module`` registers the stage's layers under their
        pipeline index and each tied module once (in ``module.tied_modules``); ``forward_funcs`` is the
        stage's forward in order; layers ``start <= idx < stop`` are this stage's (for planners, which
        build stages on the meta device in one process)."""
        from deepspeed.pipe import LayerSpec, TiedLayerSpec

        parts = self.parts(config, num_stages)
        start, stop = parts[stage], parts[stage + 1]
        module = nn.Module()
        module.tied_modules = nn.ModuleDict()
        funcs: list[Callable] = []
        for idx, spec in enumerate(self.layer_specs(config, None)[start:stop], start):
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in module.tied_modules:
                    module.tied_modules[spec.key] = spec.build()
                tied = module.tied_modules[spec.key]
                funcs.append(tied if spec.forward_fn is None else functools.partial(spec.forward_fn, tied))
            elif isinstance(spec, LayerSpec):
                layer = spec.build()
                module.add_module(str(idx), layer)
                funcs.append(layer)
            elif isinstance(spec, nn.Module):
                module.add_module(str(idx), spec)
                funcs.append(spec)
            else:  # a plain callable between layers
                funcs.append(spec)
        return module, funcs, (start, stop)

    def tied_weights(self, config: PipelineConfig, num_stages: int) -> dict[str, tuple[set[int], list[str]]]:
        """Each tied module's key -> (the stages that build it, its ``tied_weight_attr``): DeepSpeed's
        pipeline engine all-reduces those weights' gradients over those stages once per step."""
        from deepspeed.pipe import TiedLayerSpec

        parts = self.parts(config, num_stages)
        tied: dict[str, tuple[set[int], list[str]]] = {}
        for idx, spec in enumerate(self.layer_specs(config, None)):
            if isinstance(spec, TiedLayerSpec):
                owner = next(s for s in range(num_stages) if parts[s] <= idx < parts[s + 1])
                tied.setdefault(spec.key, (set(), list(spec.tied_weight_attr)))[0].add(owner)
        return tied

    def canonical_names(self, module: nn.Module, config: PipelineConfig, buffers: bool = False) -> dict[str, str]:
        """This stage's parameter names (and persistent buffers with ``buffers``) -> the plain model's names."""
        local = [name for name, _ in module.named_parameters()]
        if buffers:
            params = set(local)
            local += [name for name in module.state_dict(keep_vars=True) if name not in params]
        return dict(zip(local, self.pipeline_to_plain(dict.fromkeys(local), config)))


# ---------------------------------------------------------------------------------------- layer specs


def tied_lm_head(embedding: TokenEmbedding, x_BSD: Tensor) -> Tensor:
    """``forward_fn`` of the pipeline's tied LM head (module-level so the spec stays picklable)."""
    return embedding.logits(x_BSD)


def keep_embedding(embedding: TokenEmbedding, x_BSD: Tensor) -> Tensor:
    """``forward_fn`` of the pass-through layer that puts the tied embedding on the last stage."""
    return x_BSD


def embedding_layer_specs(config: Any) -> tuple:
    """The first and the last pipeline ``LayerSpec``: the token embedding and the LM head, one
    ``TiedLayerSpec`` module if ``config.tie_embeddings`` (shared by the model families)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if not config.tie_embeddings:
        return LayerSpec(TokenEmbedding, config), LayerSpec(LMHead, config)
    embed = TiedLayerSpec(TIED_EMBEDDING_KEY, TokenEmbedding, config, tied_weight_attr=["weight"])
    head = TiedLayerSpec(
        TIED_EMBEDDING_KEY, TokenEmbedding, config, forward_fn=tied_lm_head, tied_weight_attr=["weight"]
    )
    return embed, head


def gpt_layer_specs(config: GPTConfig, ep_group: ProcessGroup | None = None) -> list:
    """The pipeline's ``LayerSpec``/``TiedLayerSpec`` list, in the order of :func:`pipeline_layer_names`."""
    from deepspeed.pipe import LayerSpec

    embed, head = embedding_layer_specs(config)
    blocks = [LayerSpec(TransformerBlock, config, i, ep_group) for i in range(config.num_layers)]
    return [embed, LayerSpec(PositionEmbedding, config), *blocks, LayerSpec(FinalNorm, config), head]


def mtp_embedding_layer_specs(config: DecoderConfig, ep_group: ProcessGroup | None = None) -> tuple[Any, list]:
    """``(embedding spec, [MTPStack, (tied embedding,) head])``: the embedding is a tied module, and on
    the last stage the head (tied) or a pass-through layer (untied head) holds it there."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    embed = TiedLayerSpec(TIED_EMBEDDING_KEY, TokenEmbedding, config, tied_weight_attr=["weight"])
    stack = LayerSpec(MTPStack, config, ep_group)
    if config.tie_embeddings:
        head = TiedLayerSpec(
            TIED_EMBEDDING_KEY, TokenEmbedding, config, forward_fn=tied_lm_head, tied_weight_attr=["weight"]
        )
        return embed, [stack, head]
    keep = TiedLayerSpec(
        TIED_EMBEDDING_KEY, TokenEmbedding, config, forward_fn=keep_embedding, tied_weight_attr=["weight"]
    )
    return embed, [stack, keep, LayerSpec(LMHead, config)]


def decoder_layer_specs(config: DecoderConfig, ep_group: ProcessGroup | None = None) -> list:
    """The pipeline's ``LayerSpec``/``TiedLayerSpec`` list, in the order of :func:`decoder_layer_names`."""
    from deepspeed.pipe import LayerSpec

    blocks = [LayerSpec(DecoderBlock, config, i, ep_group) for i in range(config.num_layers)]
    if config.mtp_layers > 0:
        embed, tail = mtp_embedding_layer_specs(config, ep_group)
        return [embed, *blocks, LayerSpec(DecoderFinalNorm, config), *tail]
    embed, head = embedding_layer_specs(config)
    return [embed, *blocks, LayerSpec(DecoderFinalNorm, config), head]


# ---------------------------------------------------------------------------------------- GPT


GPT_PIPELINE = PipelineFamily(
    model="GPT",
    builder="gpt_pipeline",
    block="TransformerBlock",
    error=GPTConfigError,
    layer_names=pipeline_layer_names,
    layer_specs=gpt_layer_specs,
    loss_fn=lm_loss,
)


def plain_to_pipeline_state_dict(state_dict: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Rename a :class:`~moe_parallel.models.GPT` state dict to :func:`gpt_pipeline`'s names (all stages together).

    A stage holds the subset of keys its ``state_dict()`` lists; with tied embeddings the first and
    the last stage both hold ``tied_modules.embed.weight``.
    """
    return GPT_PIPELINE.plain_to_pipeline(state_dict, config)


def pipeline_to_plain_state_dict(state_dict: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Inverse of :func:`plain_to_pipeline_state_dict` (for one stage's or all stages' keys)."""
    return GPT_PIPELINE.pipeline_to_plain(state_dict, config)


def pipeline_parts(config: GPTConfig, num_stages: int) -> list[int]:
    """Stage boundaries of :func:`gpt_pipeline`: stage s builds layers ``parts[s] <= idx < parts[s+1]``.

    The same computation as DeepSpeed's ``partition_method="type:TransformerBlock"``: blocks are
    balanced over the stages (each stage gets at least one), the embeddings go to the first stage
    and the LM head to the last. Depends only on ``num_layers`` and ``num_stages``.
    """
    return GPT_PIPELINE.parts(config, num_stages)


def gpt_pipeline(
    config: GPTConfig,
    num_stages: int | None = None,
    ep_group: ProcessGroup | None = None,
    topology: ProcessTopology | None = None,
    activation_checkpoint_interval: int = 0,
    **pipeline_kwargs: Any,
) -> PipelineModule:
    """The model as a ``deepspeed.pipe.PipelineModule`` with ``loss_fn=lm_loss``.

    Needs torch.distributed initialised (DeepSpeed's comm is wrapped around it if needed) and
    ``LOCAL_RANK`` set, as the DeepSpeed launcher does. Give ``num_stages`` or a ``topology`` with a
    ``pipe`` axis. ``ep_group`` is this rank's expert-parallel group, inside its stage. Layer ``idx``
    sits on the stage given by :func:`pipeline_parts`; only ``x_BSD`` crosses stages. With
    ``activation_checkpoint_interval > 0`` only transformer blocks are recomputed.
    ``module.canonical_parameter_names()`` maps this stage's names to the plain :class:`~moe_parallel.models.GPT`'s.
    """
    return GPT_PIPELINE.build(config, num_stages, ep_group, topology, activation_checkpoint_interval, **pipeline_kwargs)


def pipeline_canonical_names(module: nn.Module, config: GPTConfig) -> dict[str, str]:
    """This stage's parameter names -> the plain :class:`~moe_parallel.models.GPT`'s names (what checkpoints store)."""
    return GPT_PIPELINE.canonical_names(module, config)


# ---------------------------------------------------------------------------------------- decoder


DECODER_PIPELINE = PipelineFamily(
    model="Decoder",
    builder="decoder_pipeline",
    block="DecoderBlock",
    error=DecoderConfigError,
    layer_names=decoder_layer_names,
    layer_specs=decoder_layer_specs,
    loss_fn=lm_loss,
)


def decoder_plain_to_pipeline(state_dict: dict[str, Any], config: DecoderConfig) -> dict[str, Any]:
    """Rename a :class:`~moe_parallel.models.Decoder` state dict to :func:`decoder_pipeline`'s names
    (all stages together)."""
    return DECODER_PIPELINE.plain_to_pipeline(state_dict, config)


def decoder_pipeline_to_plain(state_dict: dict[str, Any], config: DecoderConfig) -> dict[str, Any]:
    """Inverse of :func:`decoder_plain_to_pipeline` (for one stage's or all stages' keys)."""
    return DECODER_PIPELINE.pipeline_to_plain(state_dict, config)


def decoder_pipeline_parts(config: DecoderConfig, num_stages: int) -> list[int]:
    """Stage boundaries: stage s builds pipeline layers ``parts[s] <= idx < parts[s+1]``.

    DeepSpeed's ``partition_method="type:DecoderBlock"``: blocks balanced over the stages (at least
    one each), the embedding on the first stage and the final norm and LM head on the last.
    """
    return DECODER_PIPELINE.parts(config, num_stages)


def decoder_pipeline(
    config: DecoderConfig,
    num_stages: int | None = None,
    ep_group: ProcessGroup | None = None,
    topology: ProcessTopology | None = None,
    activation_checkpoint_interval: int = 0,
    **pipeline_kwargs: Any,
) -> PipelineModule:
    """The decoder as a ``deepspeed.pipe.PipelineModule`` with ``loss_fn=lm_loss`` (see ``gpt_pipeline``);
    with MTP, the last stage's ``loss_fn`` is an :class:`~moe_parallel.models.mtp.MTPLoss`.

    Give ``num_stages`` or a ``topology`` with a ``pipe`` axis; ``ep_group`` is this rank's
    expert-parallel group. ``module.canonical_parameter_names()`` maps this stage's names to the
    plain :class:`~moe_parallel.models.Decoder`'s, which checkpoints and ``moe_parallel.hf`` use
    (``module.decoder_config`` is ``config``).
    """
    module = DECODER_PIPELINE.build(
        config, num_stages, ep_group, topology, activation_checkpoint_interval, **pipeline_kwargs
    )
    module.decoder_config = config
    if config.mtp_layers > 0:
        attach_mtp_loss(module, config)  # the last stage's loss_fn adds the MTP loss
    return module


def decoder_canonical_names(module: nn.Module, config: DecoderConfig, buffers: bool = False) -> dict[str, str]:
    """This stage's parameter names (and persistent buffers with ``buffers``) -> the plain model's names."""
    return DECODER_PIPELINE.canonical_names(module, config, buffers=buffers)


def attach_mtp_loss(module: nn.Module, config: DecoderConfig) -> None:
    """Give a ``decoder_pipeline`` stage that holds the MTP modules (the last) an :class:`MTPLoss`."""
    stacks = [f for f in module.forward_funcs if isinstance(f, MTPStack)]
    if not stacks:
        return
    embedding = module.tied_modules[TIED_EMBEDDING_KEY]
    heads = [f for f in module.forward_funcs if isinstance(f, LMHead)]
    module.loss_fn = MTPLoss(stacks[0], embedding, heads[0] if heads else embedding)


def wrap_forward_pass(engine: Any, wrap: Callable[[Callable], Callable]) -> None:
    """Run each micro-batch's forward of a DeepSpeed ``PipelineEngine`` through ``wrap(forward)``.

    ``forward(engine, buffer_id)`` is the engine's own ``ForwardPass`` instruction; the wrapped one
    replaces it on this engine only.
    """
    from deepspeed.runtime.pipe import schedule

    forward = engine._INSTRUCTION_MAP[schedule.ForwardPass]
    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, schedule.ForwardPass: wrap(forward)}
