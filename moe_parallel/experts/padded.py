"""The padded path: runs of consecutive experts computed as batched products over ``[e, C, D]`` (CPU).

A run's rows are placed in a padded ``[e, C, D]`` layout (``C``: the run's largest row count; pad
slots are zero rows), so a run is one gather, two ``bmm``s and one gather back: a fixed handful of
operator calls for up to dozens of small experts, where the loop makes ~20 per expert.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import Tensor

from .activations import DEFAULT_CLAMP, activate, activate_backward, activate_for_backward, release, released
from .buffers import grad_buffer_like

# A run's widest padded buffer ([slots, max(D, H)]): small enough to stay in cache and to come from
# any allocator's heap warm (glibc maps blocks above 32 MiB afresh, page fault by page fault).
PADDED_RUN_BYTES = 4 << 20


def padded_slots(counts: list[int], capacity: int, device: torch.device) -> Tensor:
    """Slot of every grouped row in a padded ``[e, capacity]`` buffer: ``expert * capacity + rank in expert``."""
    num_rows = sum(counts)
    counts_e = torch.tensor(counts, device=device)
    shift_e = torch.arange(len(counts), device=device) * capacity - (torch.cumsum(counts_e, 0) - counts_e)
    return torch.repeat_interleave(shift_e, counts_e, output_size=num_rows) + torch.arange(num_rows, device=device)


def padded_runs(counts: list[int], width: int, elem_bytes: int, budget: int | None = None) -> list[range]:
    """Runs of consecutive experts with rows, each run's padded ``[len(run) * C, width]`` buffer (``C``:
    its largest row count) within ``budget`` bytes; an expert over budget alone is a run of its own."""
    budget = PADDED_RUN_BYTES if budget is None else budget
    runs, j = [], 0
    while j < len(counts):
        if counts[j] == 0:
            j += 1
            continue
        end, capacity = j + 1, counts[j]
        while end < len(counts) and counts[end] > 0:
            widest = max(capacity, counts[end])
            if (end + 1 - j) * widest * width * elem_bytes > budget:
                break
            end, capacity = end + 1, widest
        runs.append(range(j, end))
        j = end
    return runs


class PaddedRun:
    """The rows of a run of experts in a padded ``[e, C, D]`` layout: ``slot_n`` is where each of the
    run's ``n`` rows sits; pad slots hold zero rows."""

    def __init__(self, counts: list[int], experts: range, starts: list[int], device: torch.device) -> None:
        self.experts = experts
        self.rows = slice(starts[experts.start], starts[experts.stop])
        run_counts = counts[experts.start : experts.stop]
        self.capacity = max(run_counts)
        self.num_slots = len(experts) * self.capacity
        self.slot_n = padded_slots(run_counts, self.capacity, device)
        self.padded = self.num_slots > self.slot_n.numel()

    def scatter(self, rows_nD: Tensor) -> Tensor:
        """``rows_nD`` placed in padded ``[e, C, D]`` layout, pad rows zero."""
        if not self.padded:  # every expert of the run has C rows: the slots are the rows, in order
            return rows_nD.reshape(len(self.experts), self.capacity, -1)
        out = rows_nD.new_zeros(self.num_slots, rows_nD.shape[-1])
        return out.index_copy_(0, self.slot_n, rows_nD).view(len(self.experts), self.capacity, -1)

    def rows_of(self, padded_eCD: Tensor) -> Tensor:
        """The ``[n, D]`` rows of the run's experts out of a padded ``[e, C, D]`` result."""
        flat = padded_eCD.reshape(self.num_slots, -1)
        return flat.index_select(0, self.slot_n) if self.padded else flat


def _batched_linear(x_eCD: Tensor, w_eDF: Tensor, b_eF: Tensor | None, experts: range) -> Tensor:
    if b_eF is None:
        return torch.bmm(x_eCD, w_eDF)
    return torch.baddbmm(b_eF[experts.start : experts.stop].unsqueeze(1), x_eCD, w_eDF)


class PaddedExpertMLP(torch.autograd.Function):
    """The loop's MLP (:class:`~moe_parallel.experts.loop.LoopExpertMLP`, same arguments), as batched
    products over runs of experts (:func:`padded_runs`) padded to ``[e, C, D]``.

    Each run's widest padded buffer stays within ``PADDED_RUN_BYTES``. Only the pre-activation is
    saved (freed during backward); the input rows are placed again and the activation recomputed.
    """

    @staticmethod
    def forward(ctx, x, w1_eDH, w2_eFD, b1_eH, b2_eD, counts, activation, reuse_grad=False, clamp=DEFAULT_CLAMP):  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            y = torch.empty_like(x)
            y[sum(counts) :].zero_()
            starts = list(accumulate(counts, initial=0))
            runs = padded_runs(counts, max(x.shape[-1], w1_eDH.shape[-1]), x.element_size())
            layouts = [PaddedRun(counts, experts, starts, x.device) for experts in runs]
            saved: list[Tensor] = []
            for layout in layouts:
                experts = layout.experts
                run = slice(experts.start, experts.stop)
                h_eCH = _batched_linear(layout.scatter(x[layout.rows]), w1_eDH[run], b1_eH, experts)
                o_eCD = _batched_linear(activate(h_eCH, activation, clamp), w2_eFD[run], b2_eD, experts)
                saved.append(h_eCH)
                y[layout.rows] = layout.rows_of(o_eCD)
        ctx.save_for_backward(x, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved)
        ctx.counts, ctx.activation, ctx.layouts, ctx.reuse_grad = counts, activation, layouts, reuse_grad
        ctx.clamp = clamp
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        with torch.autocast(grad_y.device.type, enabled=False):
            return PaddedExpertMLP._backward(ctx, grad_y.contiguous())

    @staticmethod
    def _backward(ctx, grad_y):
        x, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved = ctx.saved_tensors
        counts, activation, clamp = ctx.counts, ctx.activation, ctx.clamp
        # A run's rows of grad_y are last read before its rows of grad_x are written.
        grad_x = grad_y if ctx.reuse_grad else torch.empty_like(x)
        grad_x[sum(counts) :].zero_()
        grads = [None if p is None else grad_buffer_like(p) for p in (w1_eDH, w2_eFD, b1_eH, b2_eD)]
        grad_w1, grad_w2, grad_b1, grad_b2 = grads
        for j, n in enumerate(counts):  # experts with no rows: zero gradients
            if n == 0:
                for grad in grads:
                    if grad is not None:
                        grad[j].zero_()
        saved_runs = iter(saved)
        for layout in ctx.layouts:
            experts = layout.experts
            run = slice(experts.start, experts.stop)
            w1, w2 = w1_eDH[run], w2_eFD[run]
            h_eCH = next(saved_runs)
            x_eCD = layout.scatter(x[layout.rows])
            if released(h_eCH):  # a second backward through a retained graph: recompute what was freed
                h_eCH = _batched_linear(x_eCD, w1, b1_eH, experts)
            a_eCF, gate_act_eCF = activate_for_backward(h_eCH, activation, clamp)
            # Each padded buffer is freed as soon as it is used; grad_a takes a's memory, grad_h
            # grad_a's (gated activations: h's).
            grad_o_eCD = layout.scatter(grad_y[layout.rows])
            torch.bmm(a_eCF.transpose(1, 2), grad_o_eCD, out=grad_w2[run])
            if grad_b2 is not None:
                torch.sum(grad_o_eCD, 1, out=grad_b2[run])
            grad_a_eCF = torch.bmm(grad_o_eCD, w2.transpose(1, 2), out=a_eCF)
            del grad_o_eCD
            grad_h_eCH = activate_backward(
                grad_a_eCF, h_eCH, activation, in_place=True, gate_act=gate_act_eCF, clamp=clamp
            )
            del a_eCF, grad_a_eCF, gate_act_eCF
            if not grad_h_eCH.is_set_to(h_eCH):  # else grad_h lives in h's memory: released after its last use
                release(h_eCH)
            torch.bmm(x_eCD.transpose(1, 2), grad_h_eCH, out=grad_w1[run])
            if grad_b1 is not None:
                torch.sum(grad_h_eCH, 1, out=grad_b1[run])
            grad_x[layout.rows] = layout.rows_of(torch.bmm(grad_h_eCH, w1.transpose(1, 2)))
            del grad_h_eCH
            release(h_eCH)
        return grad_x, *grads, None, None, None, None
