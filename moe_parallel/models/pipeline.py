"""The DeepSpeed pipeline plumbing shared by the model families (reference GPT, HF decoder).

A family's pipeline is its plain model cut into a flat list of layers: the token embedding first,
optional per-family layers, ``blocks.0 .. blocks.{L-1}``, then ``final_norm``, optional layers (the
decoder's multi-token prediction) and ``lm_head``. Pipeline layer ``idx`` holds the plain model's
parameters under prefix ``layer_names[idx]``; DeepSpeed names them ``f"{idx}.{rest}"``, except a tied
embedding, which it names ``tied_modules.embed.{rest}`` (the tied LM head, last, then has no
parameters of its own). The embedding is tied when the head is (``tie_embeddings``) and also when
the last stage needs it for multi-token prediction (``mtp_layers > 0``): see :func:`embedding_is_tied`.
:class:`PipelineFamily` says what differs between families (names, block class, error class);
everything else lives here once.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from ..core.comm import ProcessGroup

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

    def canonical_names(self, module: nn.Module, config: PipelineConfig, buffers: bool = False) -> dict[str, str]:
        """This stage's parameter names (and persistent buffers with ``buffers``) -> the plain model's names."""
        local = [name for name, _ in module.named_parameters()]
        if buffers:
            params = set(local)
            local += [name for name in module.state_dict(keep_vars=True) if name not in params]
        return dict(zip(local, self.pipeline_to_plain(dict.fromkeys(local), config)))
