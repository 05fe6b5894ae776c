"""Token dispatcher: moves each kept (token, choice) row to its expert and brings the results back.

It owns all data movement of the layer, at every expert-parallel size; the experts are raw compute.

dispatch: gather rows of ``x_TD`` in plan order (kept assignments sorted by global expert, hence by
destination rank) -> [EP > 1] counts exchange, the layer's one host sync (split sizes) -> ragged
all-to-all -> regroup the received ``[source rank][local expert]`` chunks into ``[local expert]
[source rank]`` order, so that each local expert's rows are contiguous.
combine: the same steps reversed, then the combine weights are applied where the token lives and
each token's rows are added into ``y_TD``: the weights never travel. With ``weight_on_input`` (the
config's ``input_weighted``) the weights scale the gathered rows instead, still on the token's own
rank before they leave it (the scaled rows travel, the same bytes), and combine adds the returned
rows unweighted.

At EP > 1 one layer step makes five collectives (the counts exchange, the two all-to-alls and their
backwards) and one host sync. Bad input on a rank travels as a flag in the counts exchange, so every
rank stops with a message after the same collective instead of hanging in the next one. At EP = 1
with experts that keep their counts on the device (the grouped GEMM), dispatch makes no host sync:
all ``A = T * top_k`` assignment rows go to the experts, the dropped ones past the kept counts as
padding whose output is zero and whose combine weight is masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .capacity import DispatchPlan
from .comm import (
    PendingAllToAll,
    ProcessGroup,
    all_to_all,
    eager_only,
    exchange_counts,
    group_size,
    start_all_to_all,
    wait_all_to_all,
)
from .config import MoEInputError


@dataclass
class CombineState:
    """What :meth:`AllToAllTokenDispatcher.combine` needs to undo a dispatch."""

    token_idx_M: Tensor  # source token of each dispatched row
    weight_M: Tensor  # its combine weight
    num_tokens: int
    kept_M: Tensor | None = None  # rows that are kept (None: all); padding rows add nothing
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    group_idx: Tensor | None = None  # received order [source][expert] -> local order [expert][source]
    ungroup_idx: Tensor | None = None  # its inverse


@dataclass
class Dispatch:
    """A dispatch in progress: :meth:`AllToAllTokenDispatcher.wait` gives the experts' input."""

    tokens_per_local_expert: Tensor  # int64 [e] on the device
    counts_host: list[int] | None  # the same on the host, where it was read
    state: CombineState
    x_local: Tensor | None = None  # set when the rows are here
    pending: PendingAllToAll | None = None  # the token all-to-all in flight (EP > 1)
    recv_counts_Re: Tensor | None = None


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return torch.cumsum(x, 0) - x


def regroup_index(recv_counts_Re: Tensor, total: int) -> Tensor:
    """Gather index that turns a ``[source rank][local expert]`` chunked buffer of ``total`` rows into
    ``[expert][source]`` order."""
    num_sources, num_local = recv_counts_Re.shape
    starts_Re = _exclusive_cumsum(recv_counts_Re.flatten()).view(num_sources, num_local)
    starts_S = starts_Re.t().flatten()  # chunk starts in the new (expert-major) order
    lengths_S = recv_counts_Re.t().flatten()
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
    """Moves tokens between this rank and the owners of their experts (EP group of size R).

    ``weight_on_input``: the combine weights multiply each dispatched row before the experts, and
    combine sums the experts' outputs unweighted (Llama 4); else they multiply the outputs.
    """

    def __init__(self, num_experts: int, ep_group: ProcessGroup | None, weight_on_input: bool = False) -> None:
        self.num_experts = num_experts
        self.weight_on_input = weight_on_input
        self.ep_group = ep_group
        self.ep_size = group_size(ep_group)
        self.num_local_experts = num_experts // self.ep_size

    def dispatch(
        self,
        x_TD: Tensor,
        plan: DispatchPlan,
        *,
        host_counts: bool = False,
        bad_input: Tensor | None = None,
        bad_input_message: str = "",
        overlap: bool = False,
    ) -> Dispatch:
        """Start moving the kept rows of ``x_TD`` to their experts; :meth:`wait` completes it.

        ``host_counts``: the experts read their row counts on the host (read them here, once).
        ``overlap``: the caller computes something before :meth:`wait` (the shared expert), so the
        token all-to-all is issued asynchronously; else it completes here (no work handle to hand
        off and wait on).
        ``bad_input``: a device flag (0/1) that this rank's input is bad; at EP > 1 it travels with
        the counts, and every rank raises :class:`MoEInputError` (this one with ``bad_input_message``).
        """
        if self.ep_size > 1:
            return self._dispatch_across_ranks(x_TD, plan, bad_input, bad_input_message, overlap)
        if bad_input is not None and bool(bad_input):
            raise MoEInputError(bad_input_message)
        counts_host = None
        token_idx_M, weight_M, kept_M = plan.token_idx_A, plan.weight_A, None
        if host_counts:
            counts_host = plan.tokens_per_expert_E.tolist()
            num_kept = sum(counts_host)
            token_idx_M, weight_M = token_idx_M[:num_kept], weight_M[:num_kept]
        elif plan.may_drop:
            kept_M = torch.arange(token_idx_M.numel(), device=token_idx_M.device) < plan.num_kept
        state = CombineState(token_idx_M, weight_M, x_TD.shape[0], kept_M)
        x_local = self._gather_rows(x_TD, state)
        return Dispatch(plan.tokens_per_expert_E, counts_host, state, x_local=x_local)

    @eager_only
    def _dispatch_across_ranks(
        self, x_TD: Tensor, plan: DispatchPlan, bad_input: Tensor | None, bad_input_message: str, overlap: bool
    ) -> Dispatch:
        R, e = self.ep_size, self.num_local_experts
        send_counts_Re = plan.tokens_per_expert_E.view(R, e)
        flag_R1 = torch.zeros(R, 1, dtype=torch.int64, device=send_counts_Re.device)
        if bad_input is not None:
            flag_R1 = flag_R1 + bad_input.to(torch.int64)
        recv_Rc = exchange_counts(torch.cat([send_counts_Re, flag_R1], dim=1), self.ep_group)
        recv_counts_Re = recv_Rc[:, :e]
        # The one device->host read of the layer: every split size, and every rank's verdict.
        host = torch.cat([send_counts_Re.sum(1), recv_Rc.flatten()]).tolist()
        send_splits = host[:R]
        received = [host[R + r * (e + 1) : R + (r + 1) * (e + 1)] for r in range(R)]
        if any(row[e] for row in received):
            rank = torch.distributed.get_rank(self.ep_group)
            self._raise_bad_input(bool(received[rank][e]), bad_input_message)
        recv_splits = [sum(row[:e]) for row in received]
        counts_host = [sum(row[j] for row in received) for j in range(e)]

        num_sent = sum(send_splits)
        state = CombineState(plan.token_idx_A[:num_sent], plan.weight_A[:num_sent], x_TD.shape[0])
        state.send_splits, state.recv_splits = send_splits, recv_splits
        x_send = self._gather_rows(x_TD, state)
        tokens_per_local_expert = recv_counts_Re.sum(0)
        dispatch = Dispatch(tokens_per_local_expert, counts_host, state, recv_counts_Re=recv_counts_Re)
        if overlap:
            dispatch.pending = start_all_to_all(x_send, self.ep_group, recv_splits, send_splits)
        else:
            dispatch.x_local = self._regroup(all_to_all(x_send, self.ep_group, recv_splits, send_splits), dispatch)
        return dispatch

    def _gather_rows(self, x_TD: Tensor, state: CombineState) -> Tensor:
        """The dispatched rows of ``x_TD``, scaled by their combine weights with ``weight_on_input``."""
        x_MD = x_TD.index_select(0, state.token_idx_M)
        if self.weight_on_input:
            x_MD = x_MD * state.weight_M.to(x_MD.dtype).unsqueeze(-1)
        return x_MD

    @staticmethod
    def _raise_bad_input(own: bool, message: str) -> None:
        if own:
            raise MoEInputError(message)
        raise MoEInputError(
            "another rank of the expert-parallel group received bad input (its own error names it); "
            "stopping every rank instead of hanging in the all-to-all"
        )

    @eager_only
    def fail_together(self, message: str) -> None:
        """This rank cannot route its input (``message`` says why): join the counts exchange with the
        bad-input flag set, so that every rank stops, and raise :class:`MoEInputError`."""
        if self.ep_size > 1:
            R, e = self.ep_size, self.num_local_experts
            send_Rc = torch.zeros(R, e + 1, dtype=torch.int64)
            send_Rc[:, e] = 1
            exchange_counts(send_Rc, self.ep_group)
        raise MoEInputError(message)

    def wait(self, dispatch: Dispatch) -> Tensor:
        """The experts' input rows, grouped by local expert, once they are here."""
        if dispatch.x_local is None:
            dispatch.x_local = self._receive(dispatch)
        return dispatch.x_local

    @eager_only
    def _receive(self, dispatch: Dispatch) -> Tensor:
        x_recv = wait_all_to_all(dispatch.pending)
        dispatch.pending = None
        return self._regroup(x_recv, dispatch)

    def _regroup(self, x_recv: Tensor, dispatch: Dispatch) -> Tensor:
        if self.num_local_experts == 1:
            return x_recv
        state = dispatch.state
        state.group_idx = regroup_index(dispatch.recv_counts_Re, x_recv.shape[0])
        state.ungroup_idx = torch.empty_like(state.group_idx)
        state.ungroup_idx[state.group_idx] = torch.arange(state.group_idx.numel(), device=state.group_idx.device)
        return permute_rows(x_recv, state.group_idx, state.ungroup_idx)

    def combine(self, out_local: Tensor, state: CombineState) -> Tensor:
        """Inverse of :meth:`dispatch`: ``y_TD``, each token's kept expert outputs times their weights
        (with ``weight_on_input``: unweighted, the inputs were), summed."""
        out_MD = self._return_rows(out_local, state) if self.ep_size > 1 else out_local
        weighted_MD = out_MD
        if not self.weight_on_input:
            weighted_MD = out_MD * state.weight_M.to(out_MD.dtype).unsqueeze(-1)
        if state.kept_M is not None:  # padding rows: their weights belong to dropped assignments
            weighted_MD = torch.where(state.kept_M.unsqueeze(-1), weighted_MD, 0)
        y_TD = weighted_MD.new_zeros(state.num_tokens, weighted_MD.shape[-1])
        return y_TD.index_add_(0, state.token_idx_M, weighted_MD)  # in place: no copy of the zeros

    @eager_only
    def _return_rows(self, out_local: Tensor, state: CombineState) -> Tensor:
        if state.ungroup_idx is not None:
            out_local = permute_rows(out_local, state.ungroup_idx, state.group_idx)
        return all_to_all(out_local, self.ep_group, state.send_splits, state.recv_splits)
