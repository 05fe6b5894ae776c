"""Collectives used by expert parallelism, written once for every backend (gloo, NCCL).

All functions here are called by every rank of the group, also by ranks that hold zero tokens:
skipping a collective on one rank hangs the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup


def eager_only(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)``: under ``torch.compile`` ``fn`` runs eagerly, the graph broken
    around it. Applied at the first call (as ``torch.optim`` applies it), so that importing the layer
    does not import the compiler, about a second of every process's start-up."""
    lazy = getattr(torch, "_disable_dynamo", None)
    return lazy(fn) if lazy is not None else torch.compiler.disable(fn)


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
    x: Tensor,
    group: ProcessGroup,
    output_splits: list[int] | None,
    input_splits: list[int] | None,
    async_op: bool = False,
) -> tuple[Tensor, Any]:
    x = x.contiguous()
    if output_splits is None:
        out = torch.empty_like(x)
    else:
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x, output_splits, input_splits, group=group, async_op=async_op)
    return out, work


class PendingAllToAll:
    """An all-to-all in flight: :func:`wait_all_to_all` on it returns its output, complete."""

    def __init__(self, output: Tensor, work: Any) -> None:
        self.output = output
        self.work = work


class _AllToAll(torch.autograd.Function):
    """All-to-all along dim 0 whose backward is the all-to-all with the splits swapped.

    With ``pending`` the forward only issues it (``async_op``) and records the work handle there;
    :class:`_Wait` completes it, so that computation placed between the two overlaps the transfer.
    """

    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits, pending):  # type: ignore[override]
        ctx.group = group
        ctx.output_splits = output_splits
        ctx.input_splits = input_splits
        out, work = _all_to_all(x, group, output_splits, input_splits, async_op=pending is not None)
        if pending is not None:
            pending.work = work
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_in, _ = _all_to_all(grad_out, ctx.group, ctx.input_splits, ctx.output_splits)
        return grad_in, None, None, None, None


class _Wait(torch.autograd.Function):
    """Identity that first waits for an issued all-to-all (whose output is its input)."""

    @staticmethod
    def forward(ctx, out, pending):  # type: ignore[override]
        if pending.work is not None:
            pending.work.wait()
            pending.work = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


@eager_only
def all_to_all(
    x: Tensor,
    group: ProcessGroup,
    output_splits: list[int] | None = None,
    input_splits: list[int] | None = None,
) -> Tensor:
    """Autograd-aware all-to-all along dim 0: uniform when the splits are None, ragged otherwise.

    ``input_splits[r]`` rows of ``x`` go to rank ``r``; ``output_splits[r]`` rows arrive from rank ``r``.
    """
    return _AllToAll.apply(x, group, output_splits, input_splits, None)


@eager_only
def start_all_to_all(
    x: Tensor,
    group: ProcessGroup,
    output_splits: list[int] | None = None,
    input_splits: list[int] | None = None,
) -> PendingAllToAll:
    """:func:`all_to_all`, issued without waiting: complete it with :func:`wait_all_to_all`.

    The backward of the pair is one synchronous all-to-all, as for :func:`all_to_all`.
    """
    pending = PendingAllToAll(None, None)  # type: ignore[arg-type]
    pending.output = _AllToAll.apply(x, group, output_splits, input_splits, pending)
    return pending


@eager_only
def wait_all_to_all(pending: PendingAllToAll) -> Tensor:
    """The output of an all-to-all issued by :func:`start_all_to_all`, once it has arrived."""
    return _Wait.apply(pending.output, pending)


@eager_only
def exchange_counts(send_Rc: Tensor, group: ProcessGroup) -> Tensor:
    """Send row r of ``send_Rc`` (``[R, c]`` integers) to rank r; returns the rows every rank sent us."""
    recv = torch.empty_like(send_Rc)
    dist.all_to_all_single(recv, send_Rc.contiguous(), group=group)
    return recv
