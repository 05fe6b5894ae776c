"""What the MoE layer asks of its experts: raw compute on rows grouped by local expert.

An experts module has ``num_local_experts`` and ``first_expert_id`` (the global id of its local
expert 0), and ``forward(x, tokens_per_expert, counts_host=None)`` returns one output row per input
row: rows are grouped by local expert, ``tokens_per_expert`` (an int tensor on the device) rows
each, and rows past their sum are padding whose output must be zero. ``needs_host_counts(x)`` says
whether the forward reads the counts on the host: the dispatcher then reads them once and passes
them as ``counts_host``. The dispatcher owns everything else: gathering rows, moving them between
ranks, applying the combine weights and adding each token's outputs.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class Experts(Protocol):
    num_local_experts: int
    first_expert_id: int

    def needs_host_counts(self, x: Tensor) -> bool: ...

    def __call__(self, x: Tensor, tokens_per_expert: Tensor, counts_host: list[int] | None = None) -> Tensor: ...


def host_counts(
    module: nn.Module, x: Tensor, tokens_per_expert: Tensor | list[int], counts_host: list[int] | None
) -> list[int]:
    """The rows per local expert as a host list (read from the device only when not given), checked."""
    counts = counts_host
    if counts is None:
        counts = tokens_per_expert.tolist() if isinstance(tokens_per_expert, Tensor) else list(tokens_per_expert)
    if len(counts) != module.num_local_experts or sum(counts) > x.shape[0] or min(counts, default=0) < 0:
        raise ValueError(
            f"tokens_per_expert={counts} must have {module.num_local_experts} non-negative entries "
            f"summing to at most the {x.shape[0]} rows"
        )
    return counts
