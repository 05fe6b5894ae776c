"""Regional compilation: ``torch.compile`` on each transformer block, in place.

Compiling block by block (as torchtitan does) instead of the whole model keeps compile time
independent of depth: the blocks of one kind (dense or MoE) share one compiled graph, and the
embeddings, the LM head and the pipeline plumbing stay eager. :func:`compile_block` compiles the
block's ``forward`` method in place rather than wrapping the block in ``torch.compile(block)``:

* parameter and buffer names stay as they are (a wrapper module adds ``_orig_mod.``), so state
  dicts, checkpoints, canonical pipeline names, the DeepSpeed engine and pipeline partitioning by
  block class see the same model;
* forward hooks on the block itself run eagerly, outside the compiled code. Hooks on modules
  *inside* a compiled block run inside its graph, where anything the compiler cannot trace splits
  the graph; :class:`~moe_parallel.training.metrics.MoEMetricsTracker` and
  :class:`~moe_parallel.training.metrics.NonFiniteProbe` therefore hook a compiled block instead of its
  submodules (:func:`compiled_owners`). Compile the blocks before attaching them.

Dynamo's ``capture_scalar_outputs`` and ``capture_dynamic_output_shape_ops`` are on while a
compiled block runs (:data:`DYNAMO_OPTIONS`): an MoE block's per-expert token counts are data
dependent, and without them reading one would end the graph. They are set around each call, not
process-wide.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# Dynamo settings in force while a compiled block traces (see the module docstring).
DYNAMO_OPTIONS: dict[str, Any] = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}


def is_compiled(module: nn.Module) -> bool:
    """Whether :func:`compile_block` compiled ``module``'s forward."""
    return getattr(module, "compiled_forward", None) is not None


def compile_block(block: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile ``block.forward`` in place with ``torch.compile(**compile_kwargs)``; returns ``block``.

    The compiled callable is ``block.compiled_forward`` (e.g. for ``torch._dynamo.explain``). A block
    compiled already is left as it is.
    """
    if is_compiled(block):
        return block
    compiled = torch.compile(block.forward, **compile_kwargs)

    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(DYNAMO_OPTIONS):
            return compiled(*args, **kwargs)

    forward.__doc__ = type(block).forward.__doc__
    block.forward = forward  # an instance attribute: nn.Module.__call__ looks it up on the instance
    block.compiled_forward = compiled
    return block


def block_types() -> tuple[type[nn.Module], ...]:
    """The transformer-block classes of the model families: the reference GPT's and the decoder's."""
    from ..models import DecoderBlock, TransformerBlock

    return (TransformerBlock, DecoderBlock)


def compile_blocks(
    model: nn.Module, types: Iterable[type[nn.Module]] | None = None, **compile_kwargs: Any
) -> list[nn.Module]:
    """Compile every transformer block of ``model`` (a plain model or one pipeline stage) in place.

    ``types`` are the block classes (default :func:`block_types`); ``compile_kwargs`` go to
    ``torch.compile`` (e.g. ``backend``, ``fullgraph``, ``mode``). Returns the compiled blocks, in
    module order. Attach metrics hooks after this, not before (see the module docstring).
    """
    kinds = tuple(types) if types is not None else block_types()
    blocks = [module for module in model.modules() if isinstance(module, kinds)]
    return [compile_block(block, **compile_kwargs) for block in blocks]


def compiled_owners(model: nn.Module) -> dict[int, nn.Module]:
    """``id(module) -> compiled block`` for every module strictly inside a compiled block of ``model``
    (the outermost one, if compiled blocks nest): where a hook has to go to run eagerly."""
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        if is_compiled(module) and id(module) not in owners:
            for inner in module.modules():
                if inner is not module:
                    owners[id(inner)] = module
    return owners
