"""Collectives used by expert parallelism, written once for every backend (gloo, NCCL).

All functions here are called by every rank of the group, also by ranks that hold zero tokens:
skipping a collective on one rank hangs the others.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    """World size of ``group``; 1 when torch.distributed is not initialised or no group is given."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object); the value itself without distribution."""
    if not dist.is_available() or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def group_rank(group: ProcessGroup | None) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _all_to_all(
    x: Tensor, group: ProcessGroup, output_splits: list[int] | None, input_splits: list[int] | None
) -> Tensor:
    x = x.contiguous()
    if output_splits is None:
        out = torch.empty_like(x)
    else:
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """All-to-all along dim 0 whose backward is the all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):  # type: ignore[override]
        ctx.group = group
        ctx.output_splits = output_splits
        ctx.input_splits = input_splits
        return _all_to_all(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_in = _all_to_all(grad_out, ctx.group, ctx.input_splits, ctx.output_splits)
        return grad_in, None, None, None


def all_to_all(
    x: Tensor,
    group: ProcessGroup,
    output_splits: list[int] | None = None,
    input_splits: list[int] | None = None,
) -> Tensor:
    """Autograd-aware all-to-all along dim 0: uniform when the splits are None, ragged otherwise.

    ``input_splits[r]`` rows of ``x`` go to rank ``r``; ``output_splits[r]`` rows arrive from rank ``r``.
    """
    return _AllToAll.apply(x, group, output_splits, input_splits)


def exchange_counts(send_counts_R: Tensor, group: ProcessGroup) -> Tensor:
    """Send ``send_counts_R.view(R, -1)[r]`` to rank r; returns what every rank sent to us, same shape."""
    recv = torch.empty_like(send_counts_R)
    dist.all_to_all_single(recv, send_counts_R.contiguous(), group=group)
    return recv


def all_reduce_max(values: list[int], group: ProcessGroup, device: torch.device) -> list[int]:
    """Element-wise maximum over the group of small integer vectors (one collective)."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()
