"""Token dispatcher: permute kept tokens to their experts' ranks and bring the results back.

dispatch: gather rows of ``x_TD`` in plan order (sorted by global expert, hence by destination rank)
-> ragged all-to-all over the EP group -> regroup the received ``[source rank][local expert]``
chunks into ``[local expert][source rank]`` order, so each local expert's rows are contiguous.
combine: the same steps reversed, then a weighted scatter-add into ``y_TD`` (the weight itself is
applied inside the experts).

Only kept tokens travel: capacity bounds the buffers, and a dropless plan uses the very same path.
Counts are exchanged first (one small all-to-all) so every rank knows its split sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .capacity import DispatchPlan
from .comm import ProcessGroup, all_to_all, exchange_counts, group_size


@dataclass
class CombineState:
    """What :meth:`AllToAllTokenDispatcher.combine` needs to undo a dispatch."""

    token_idx_N: Tensor
    num_tokens: int
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    group_idx: Tensor | None = None  # received order [source][expert] -> local order [expert][source]
    ungroup_idx: Tensor | None = None  # its inverse


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return torch.cumsum(x, 0) - x


def regroup_index(recv_counts_Re: Tensor) -> Tensor:
    """Gather index that turns a ``[source rank][local expert]`` chunked buffer into ``[expert][source]``."""
    num_sources, num_local = recv_counts_Re.shape
    starts_Re = _exclusive_cumsum(recv_counts_Re.flatten()).view(num_sources, num_local)
    starts_S = starts_Re.t().flatten()  # chunk starts in the new (expert-major) order
    lengths_S = recv_counts_Re.t().flatten()
    total = int(lengths_S.sum())
    shift_S = starts_S - _exclusive_cumsum(lengths_S)
    return torch.repeat_interleave(shift_S, lengths_S, output_size=total) + torch.arange(
        total, device=recv_counts_Re.device
    )


class _Permute(torch.autograd.Function):
    """``x[perm]`` for a permutation whose inverse is known: backward is one gather with the inverse.

    (Plain ``x[perm]`` would back-propagate through a zero-filled buffer and an accumulating scatter.)
    """

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
    """Rows of ``x`` in the order ``perm`` (``inverse`` must be its inverse permutation)."""
    return _Permute.apply(x, perm, inverse)


class AllToAllTokenDispatcher:
    """Moves tokens between this rank and the owners of their experts (EP group of size R)."""

    def __init__(self, num_experts: int, ep_group: ProcessGroup | None) -> None:
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = group_size(ep_group)
        self.num_local_experts = num_experts // self.ep_size

    def dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> tuple[Tensor, Tensor, list[int], CombineState]:
        """Returns the local experts' input rows, their combine weights, rows per local expert, and state."""
        x_ND = x_TD.index_select(0, plan.token_idx_N)
        state = CombineState(plan.token_idx_N, x_TD.shape[0])
        if self.ep_size == 1:
            return x_ND, plan.weight_N, plan.tokens_per_expert_E.tolist(), state

        R, e = self.ep_size, self.num_local_experts
        send_counts_Re = plan.tokens_per_expert_E.view(R, e)
        recv_counts_Re = exchange_counts(plan.tokens_per_expert_E, self.ep_group).view(R, e)
        # One device->host copy for every split size we need.
        host = torch.cat([send_counts_Re.sum(1), recv_counts_Re.sum(1), recv_counts_Re.sum(0)]).tolist()
        state.send_splits, state.recv_splits = host[:R], host[R : 2 * R]
        tokens_per_local_expert = host[2 * R :]

        x_recv = all_to_all(x_ND, self.ep_group, state.recv_splits, state.send_splits)
        weight_recv = all_to_all(plan.weight_N, self.ep_group, state.recv_splits, state.send_splits)
        if e == 1:
            return x_recv, weight_recv, tokens_per_local_expert, state
        group_idx = regroup_index(recv_counts_Re)
        state.group_idx = group_idx
        state.ungroup_idx = torch.empty_like(group_idx)
        state.ungroup_idx[group_idx] = torch.arange(group_idx.numel(), device=group_idx.device)
        x_local = permute_rows(x_recv, group_idx, state.ungroup_idx)
        weight_local = permute_rows(weight_recv, group_idx, state.ungroup_idx)
        return x_local, weight_local, tokens_per_local_expert, state

    def combine(self, out_local: Tensor, state: CombineState) -> Tensor:
        """Inverse of :meth:`dispatch`: returns ``y_TD``, the sum over each token's kept experts."""
        out_ND = out_local
        if self.ep_size > 1:
            if state.ungroup_idx is not None:
                out_ND = permute_rows(out_ND, state.ungroup_idx, state.group_idx)
            out_ND = all_to_all(out_ND, self.ep_group, state.send_splits, state.recv_splits)
        y_TD = out_ND.new_zeros(state.num_tokens, out_ND.shape[-1])
        return y_TD.index_add_(0, state.token_idx_N, out_ND)  # in place: no copy of the zeros
