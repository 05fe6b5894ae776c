"""Local experts as one module with stacked weights, run as a grouped MLP over routed tokens only.

Tokens arrive sorted by local expert, ``tokens_per_expert[j]`` rows each, so every expert is two
matrix products on a contiguous slice: capacity bounds the buffers, it never adds FLOPs. The combine
weight is folded into the expert (``(w * a) @ W2 == w * (a @ W2)``, one row scale over min(D, F)
columns), and the activation is recomputed in backward from the pre-activation instead of being
stored.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Activation, ExpertGemm
from .cpu_buffers import grad_buffer_like
from .expert_cost import choose_expert_path

aten = torch.ops.aten


def expert_seed(init_seed: int, layer_number: int, global_expert_id: int) -> int:
    """Seed of one expert's initialisation: depends on its *global* id, never on the EP layout."""
    return (init_seed * 1_000_003 + layer_number * 10_007 + global_expert_id) % (2**63 - 1)


def activate(h: Tensor, activation: str) -> Tensor:
    """The experts' activation; ``swiglu`` splits ``h`` into (gate, up) halves."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "silu":
        return F.silu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


_ELEMENTWISE_BACKWARD = {
    "gelu": (aten.gelu_backward, ()),
    "relu": (aten.threshold_backward, (0,)),
    "silu": (aten.silu_backward, ()),
}


def _activate_backward(grad_a: Tensor, h: Tensor, activation: str, in_place: bool = False) -> Tensor:
    """``dL/dh`` from ``dL/da``; ``in_place``: written over ``grad_a`` where the activation allows it."""
    if activation in _ELEMENTWISE_BACKWARD:
        op, args = _ELEMENTWISE_BACKWARD[activation]
        return op.grad_input(grad_a, h, *args, grad_input=grad_a) if in_place else op(grad_a, h, *args)
    gate, up = h.chunk(2, dim=-1)
    silu_gate = F.silu(gate)
    return torch.cat([aten.silu_backward(grad_a * up, gate), grad_a * silu_gate], dim=-1)


def _row_blocks(counts: list[int]) -> list[slice]:
    """Each expert's block of rows (possibly empty), in expert order."""
    blocks, start = [], 0
    for n in counts:
        blocks.append(slice(start, start + n))
        start += n
    return blocks


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    if bias is None:
        return torch.mm(x, weight, out=out)
    return torch.addmm(bias, x, weight, out=out)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products, accumulated in float32 (or wider, for float64 rows)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (a.to(dtype) * b.to(dtype)).sum(-1)


def _unbind(param: Tensor | None) -> tuple[Tensor, ...] | None:
    return None if param is None else param.unbind(0)


def _scale_output(w2_eFD: Tensor) -> bool:
    """Where the combine weight goes: on the ``[n, D]`` output when D <= F, else on the ``[n, F]`` activation."""
    return w2_eFD.shape[-1] <= w2_eFD.shape[-2]


class _ExpertMLP(torch.autograd.Function):
    """y[t(i)] += w_i * (act(x[t(i)] @ W1[j] + b1[j]) @ W2[j] + b2[j]) for every row i of expert j.

    Rows are grouped by expert, ``counts[j]`` each. With ``token_idx_N`` row i reads and adds to
    token ``token_idx_N[i]`` of ``x``/``y`` (the single-rank path: each expert gathers its own rows
    and scatter-adds its output, so no ``[N, D]`` routed buffer exists and each expert's rows stay in
    cache); without it row i is row i (rows that an all-to-all delivered already grouped).

    The row scale ``w`` goes on the narrower side of the second product. When D <= F it scales the
    ``[n, D]`` output and the unscaled output ``o`` is kept: ``dL/dw = <g, o>`` is a dot over D and
    ``w * g`` feeds both weight gradients, so no ``[n, F]`` pass is spent on the scale. When D > F it
    scales the ``[n, F]`` activation in place.

    ``reuse_grad`` (grouped rows only): the caller owns the output's gradient and nothing else reads it,
    so the input gradient is written over it in place, one ``[N, D]`` buffer less at backward's peak.

    Only the pre-activation (and ``o``) is saved, per expert; backward gathers the input rows again
    and recomputes the activation. Measured on CPU, saving the gathered rows and the activation as
    autograd would was slower, not faster: the extra live memory costs more in page faults and cold
    reads than the gather and the activation cost to redo. Per-expert tensors (rather than one
    ``[N, F]`` buffer) let the allocator reuse warm memory from step to step.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x, weight_N, token_idx_N, w1_eDH, w2_eFD, b1_eH, b2_eD, counts, activation, unique=False, reuse_grad=False
    ):
        # The caller cast everything to the activations' dtype; autocast must not recast the products.
        with torch.autocast(x.device.type, enabled=False):
            scaled = weight_N is not None
            keep_output = scaled and _scale_output(w2_eFD)
            gather = token_idx_N is not None
            rows = token_idx_N.split(counts) if gather else _row_blocks(counts)
            scales = weight_N.to(x.dtype).unsqueeze(-1).split(counts) if scaled else None
            w1, w2, b1, b2 = (_unbind(p) for p in (w1_eDH, w2_eFD, b1_eH, b2_eD))
            y = _combine_buffer(x, token_idx_N, unique) if gather else torch.empty_like(x)
            saved: list[Tensor] = []
            for j, n in enumerate(counts):
                if n == 0:
                    continue
                x_e = x.index_select(0, rows[j]) if gather else x[rows[j]]
                h = _linear(x_e, w1[j], None if b1 is None else b1[j])
                a = activate(h, activation)  # a fresh tensor; h is saved, a is recomputed in backward
                saved.append(h)
                b2_j = None if b2 is None else b2[j]
                dest = None if gather else y[rows[j]]  # grouped rows: write the output in place
                if not scaled:
                    out = _linear(a, w2[j], b2_j, out=dest)
                elif keep_output:
                    o = _linear(a, w2[j], b2_j)
                    saved.append(o)
                    out = torch.mul(o, scales[j], out=dest)
                else:
                    s = scales[j]
                    out = _linear(a.mul_(s), w2[j], None if b2_j is None else s * b2_j, out=dest)
                if gather:  # top-1: no token twice, so a write (parallel) instead of an accumulation
                    (y.index_copy_ if unique else y.index_add_)(0, rows[j], out)
        ctx.save_for_backward(x, weight_N, token_idx_N, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved)
        ctx.counts, ctx.activation, ctx.keep_output, ctx.unique = counts, activation, keep_output, unique
        ctx.reuse_grad = reuse_grad and not gather
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        with torch.autocast(grad_y.device.type, enabled=False):
            return _ExpertMLP._backward(ctx, grad_y.contiguous())

    @staticmethod
    def _backward(ctx, grad_y):
        x, weight_N, token_idx_N, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved = ctx.saved_tensors
        counts, activation, keep_output = ctx.counts, ctx.activation, ctx.keep_output
        scaled, gather = weight_N is not None, token_idx_N is not None
        rows = token_idx_N.split(counts) if gather else _row_blocks(counts)
        if gather:
            grad_x = _combine_buffer(x, token_idx_N, ctx.unique)
        else:  # expert j's rows of grad_y are last read before its rows of grad_x are written
            grad_x = grad_y if ctx.reuse_grad else torch.empty_like(x)
        # Weight gradients are [e, D, F] tensors every step: recycled memory spares their page faults.
        grads = [None if p is None else grad_buffer_like(p) for p in (w1_eDH, w2_eFD, b1_eH, b2_eD)]
        grad_w1, grad_w2, grad_b1, grad_b2 = (_unbind(g) for g in grads)
        w1, w2, b1, b2 = (_unbind(p) for p in (w1_eDH, w2_eFD, b1_eH, b2_eD))
        if scaled:
            scales = weight_N.to(grad_y.dtype).unsqueeze(-1).split(counts)
            grad_weight_N = torch.empty_like(weight_N)
            grad_weights = grad_weight_N.split(counts)
        saved_rows = iter(saved)
        for j, n in enumerate(counts):
            if n == 0:  # no rows: zero gradients
                for grad in (grad_w1, grad_w2, grad_b1, grad_b2):
                    if grad is not None:
                        grad[j].zero_()
                continue
            h = next(saved_rows)
            o = next(saved_rows) if keep_output else None
            x_e = x.index_select(0, rows[j]) if gather else x[rows[j]]
            if _released(h):  # a second backward through a retained graph: recompute what was freed
                h = _linear(x_e, w1[j], None if b1 is None else b1[j])
            a = activate(h, activation)
            g = grad_y.index_select(0, rows[j]) if gather else grad_y[rows[j]]
            if keep_output:  # out = s * o: dL/ds = <g, o>, then s * g feeds everything
                if _released(o):
                    o = _linear(a, w2[j], None if b2 is None else b2[j])
                grad_weights[j].copy_(_row_dot(g, o))
                _release(o)
                ours = gather or ctx.reuse_grad  # a gathered g, or rows of a grad_y we own, are ours to scale
                g = g.mul_(scales[j]) if ours else g * scales[j]
            # Beside h, one [n, F] tensor at a time (a, then grad_a, which grad_h overwrites; the
            # D > F form needs a and grad_a together for dL/ds): the last experts' backward runs
            # beside the whole weight gradient, the step's peak at EP > 1.
            if not scaled or keep_output:
                torch.mm(a.t(), g, out=grad_w2[j])
                del a
                if grad_b2 is not None:
                    torch.sum(g, 0, out=grad_b2[j])
                grad_a = torch.mm(g, w2[j].t())
            else:  # out = (s * a) @ W2 + s * b2
                s = scales[j]
                grad_a = torch.mm(g, w2[j].t())
                dot = _row_dot(grad_a, a)
                if b2 is not None:
                    dot += g.to(dot.dtype) @ b2[j].to(dot.dtype)
                    torch.sum(g * s, 0, out=grad_b2[j])
                grad_weights[j].copy_(dot)
                torch.mm(a.mul_(s).t(), g, out=grad_w2[j])  # a is recomputed here: ours to scale
                del a
                grad_a.mul_(s)
            grad_h = _activate_backward(grad_a, h, activation, in_place=True)
            _release(h)
            torch.mm(x_e.t(), grad_h, out=grad_w1[j])
            if grad_b1 is not None:
                torch.sum(grad_h, 0, out=grad_b1[j])
            if gather:
                (grad_x.index_copy_ if ctx.unique else grad_x.index_add_)(0, rows[j], torch.mm(grad_h, w1[j].t()))
            else:
                torch.mm(grad_h, w1[j].t(), out=grad_x[rows[j]])
        return grad_x, grad_weight_N if scaled else None, None, *grads, None, None, None, None


def _same(t: Tensor) -> Tensor:
    return t


def _combine_buffer(x: Tensor, token_idx_N: Tensor, unique: bool) -> Tensor:
    """The ``[T, D]`` buffer the experts' rows are combined into: zeros, except under top-1 routing,
    where every kept row is written (not added) and only the dropped tokens' rows need zeroing, which
    spares a full ``[T, D]`` fill pass."""
    if not unique:
        return torch.zeros_like(x)
    buffer = torch.empty_like(x)
    dropped_T = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    dropped_T[token_idx_N] = False
    return buffer.index_fill_(0, dropped_T.nonzero().flatten(), 0)


def _release(saved: Tensor) -> None:
    """Free a saved intermediate's memory now, not when backward returns. Every expert's saved
    pre-activation would otherwise live beside the whole stacked weight gradient at the end of
    backward: the step's peak at large experts (BENCHMARKS.md, "Peak memory"), where a per-expert
    layer like DeepSpeed's has freed them one by one."""
    saved.untyped_storage().resize_(0)


def _released(saved: Tensor) -> bool:
    return saved.numel() > 0 and saved.untyped_storage().nbytes() == 0


def padded_slots(counts: list[int], capacity: int, device: torch.device) -> Tensor:
    """Slot of every grouped row in a padded ``[e, capacity]`` buffer: ``expert * capacity + rank in expert``."""
    num_rows = sum(counts)
    counts_e = torch.tensor(counts, device=device)
    shift_e = torch.arange(len(counts), device=device) * capacity - (torch.cumsum(counts_e, 0) - counts_e)
    return torch.repeat_interleave(shift_e, counts_e, output_size=num_rows) + torch.arange(num_rows, device=device)


# A run's widest padded buffer ([slots, max(D, H)]): small enough to stay in cache and to come from
# any allocator's heap warm (glibc maps blocks above 32 MiB afresh, page fault by page fault).
PADDED_RUN_BYTES = 4 << 20


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


class _PaddedRun:
    """The rows of a run of experts in a padded ``[e, C, D]`` layout: ``slot_n`` is where each of the
    run's ``n`` rows sits, ``source_n`` which row of ``x`` it reads; pad slots hold zero rows."""

    def __init__(self, counts: list[int], experts: range, starts: list[int], token_idx_N: Tensor | None, device):
        self.experts = experts
        self.rows = slice(starts[experts.start], starts[experts.stop])
        run_counts = counts[experts.start : experts.stop]
        self.capacity = max(run_counts)
        self.num_slots = len(experts) * self.capacity
        self.slot_n = padded_slots(run_counts, self.capacity, device)
        rows = self.rows
        self.source_n = (
            token_idx_N[rows] if token_idx_N is not None else torch.arange(rows.start, rows.stop, device=device)
        )
        self.padded = self.num_slots > self.slot_n.numel()
        if self.padded:  # pad slots read row 0 and are zeroed after the gather
            pad_S = torch.ones(self.num_slots, dtype=torch.bool, device=device)
            pad_S[self.slot_n] = False
            self.pad_slots = pad_S.nonzero().flatten()
            self.source_S = torch.zeros(self.num_slots, dtype=torch.long, device=device)
            self.source_S.index_copy_(0, self.slot_n, self.source_n)

    def gather(self, x: Tensor) -> Tensor:
        """The run's rows of ``x`` in padded ``[e, C, D]`` layout, pad rows zero."""
        if not self.padded:  # every expert of the run has C rows: the slots are the rows, in order
            return x.index_select(0, self.source_n).view(len(self.experts), self.capacity, -1)
        padded_SD = x.index_select(0, self.source_S).index_fill_(0, self.pad_slots, 0)
        return padded_SD.view(len(self.experts), self.capacity, -1)

    def scatter(self, rows_nD: Tensor) -> Tensor:
        """``rows_nD`` placed in padded ``[e, C, D]`` layout, pad rows zero."""
        if not self.padded:
            return rows_nD.view(len(self.experts), self.capacity, -1)
        out = rows_nD.new_zeros(self.num_slots, rows_nD.shape[-1])
        return out.index_copy_(0, self.slot_n, rows_nD).view(len(self.experts), self.capacity, -1)

    def rows_of(self, padded_eCD: Tensor) -> Tensor:
        """The ``[n, D]`` rows of the run's experts out of a padded ``[e, C, D]`` result."""
        flat = padded_eCD.reshape(self.num_slots, -1)
        return flat.index_select(0, self.slot_n) if self.padded else flat


class _PaddedExpertMLP(torch.autograd.Function):
    """The same MLP as :class:`_ExpertMLP`, as batched products over runs of experts padded to ``[e, C, D]``.

    Consecutive experts form a run (:func:`padded_runs`) whose widest padded buffer stays within
    ``PADDED_RUN_BYTES``; ``C`` is the run's largest row count, so padding costs the rows by which
    the run's experts fall short of it. Each run is one gather, two ``bmm``s and one combine, a fixed
    handful of operator calls for up to dozens of small experts, where the loop makes ~20 per expert.
    As in the loop, only the pre-activation and the unscaled output rows are saved (freed during
    backward), the input rows are gathered again and the activation recomputed, and with
    ``token_idx_N`` row i reads and adds into token ``token_idx_N[i]`` (``unique``: writes, top-1).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x, weight_N, token_idx_N, w1_eDH, w2_eFD, b1_eH, b2_eD, counts, activation, unique=False, reuse_grad=False
    ):
        with torch.autocast(x.device.type, enabled=False):
            gather, scaled = token_idx_N is not None, weight_N is not None
            y = _combine_buffer(x, token_idx_N, unique) if gather else torch.empty_like(x)
            scale_N1 = weight_N.to(x.dtype).unsqueeze(-1) if scaled else None
            starts = list(accumulate(counts, initial=0))
            runs = padded_runs(counts, max(x.shape[-1], w1_eDH.shape[-1]), x.element_size())
            layouts = [_PaddedRun(counts, experts, starts, token_idx_N, x.device) for experts in runs]
            saved: list[Tensor] = []
            for layout in layouts:
                experts = layout.experts
                run = slice(experts.start, experts.stop)
                h_eCH = _batched_linear(layout.gather(x), w1_eDH[run], b1_eH, experts)
                o_eCD = _batched_linear(activate(h_eCH, activation), w2_eFD[run], b2_eD, experts)
                saved.append(h_eCH)
                o_nD = layout.rows_of(o_eCD)
                dest = None if gather else y[layout.rows]
                if scaled:
                    saved.append(o_nD)
                    out = torch.mul(o_nD, scale_N1[layout.rows], out=dest)
                elif dest is not None:
                    out = dest.copy_(o_nD)
                else:
                    out = o_nD
                if gather:
                    (y.index_copy_ if unique else y.index_add_)(0, layout.source_n, out)
        ctx.save_for_backward(x, weight_N, token_idx_N, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved)
        ctx.counts, ctx.activation, ctx.unique, ctx.layouts = counts, activation, unique, layouts  # index tensors
        ctx.reuse_grad = reuse_grad and not gather
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        with torch.autocast(grad_y.device.type, enabled=False):
            return _PaddedExpertMLP._backward(ctx, grad_y.contiguous())

    @staticmethod
    def _backward(ctx, grad_y):
        x, weight_N, token_idx_N, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved = ctx.saved_tensors
        counts, activation = ctx.counts, ctx.activation
        gather, scaled = token_idx_N is not None, weight_N is not None
        if gather:
            grad_x = _combine_buffer(x, token_idx_N, ctx.unique)
        else:  # a run's rows of grad_y are last read before its rows of grad_x are written
            grad_x = grad_y if ctx.reuse_grad else torch.empty_like(x)
        params = (w1_eDH, w2_eFD, b1_eH, b2_eD)
        grads = [None if p is None else grad_buffer_like(p) for p in params]
        grad_w1, grad_w2, grad_b1, grad_b2 = grads
        for j, n in enumerate(counts):  # experts with no rows: zero gradients
            if n == 0:
                for grad in grads:
                    if grad is not None:
                        grad[j].zero_()
        grad_weight_N = torch.empty_like(weight_N) if scaled else None
        scale_N1 = weight_N.to(grad_y.dtype).unsqueeze(-1) if scaled else None
        saved_rows = iter(saved)
        for layout in ctx.layouts:
            experts = layout.experts
            run = slice(experts.start, experts.stop)
            w1, w2 = w1_eDH[run], w2_eFD[run]
            h_eCH = next(saved_rows)
            if _released(h_eCH):  # a second backward through a retained graph: recompute what was freed
                h_eCH = _batched_linear(layout.gather(x), w1, b1_eH, experts)
            a_eCF = activate(h_eCH, activation)
            g_nD = grad_y.index_select(0, layout.source_n) if gather else grad_y[layout.rows]
            if scaled:  # out = s * o: dL/ds = <g, o>, then s * g feeds everything
                o_nD = next(saved_rows)
                if _released(o_nD):
                    o_nD = layout.rows_of(_batched_linear(a_eCF, w2, b2_eD, experts))
                grad_weight_N[layout.rows] = _row_dot(g_nD, o_nD)
                _release(o_nD)
                g_nD = g_nD.mul_(scale_N1[layout.rows]) if gather else g_nD * scale_N1[layout.rows]
            # Each padded buffer is freed as soon as it is used: at most two of them are alive at a time.
            grad_o_eCD = layout.scatter(g_nD)
            del g_nD
            torch.bmm(a_eCF.transpose(1, 2), grad_o_eCD, out=grad_w2[run])
            del a_eCF
            if grad_b2 is not None:
                torch.sum(grad_o_eCD, 1, out=grad_b2[run])
            grad_a_eCF = torch.bmm(grad_o_eCD, w2.transpose(1, 2))
            del grad_o_eCD
            grad_h_eCH = _activate_backward(grad_a_eCF, h_eCH, activation, in_place=True)
            del grad_a_eCF
            _release(h_eCH)
            torch.bmm(layout.gather(x).transpose(1, 2), grad_h_eCH, out=grad_w1[run])
            if grad_b1 is not None:
                torch.sum(grad_h_eCH, 1, out=grad_b1[run])
            grad_x_nD = layout.rows_of(torch.bmm(grad_h_eCH, w1.transpose(1, 2)))
            del grad_h_eCH
            if gather:
                (grad_x.index_copy_ if ctx.unique else grad_x.index_add_)(0, layout.source_n, grad_x_nD)
            else:
                grad_x[layout.rows] = grad_x_nD
        return grad_x, grad_weight_N, None, *grads, None, None, None, None


def _batched_linear(x_eCD: Tensor, w_eDF: Tensor, b_eF: Tensor | None, experts: range) -> Tensor:
    if b_eF is None:
        return torch.bmm(x_eCD, w_eDF)
    return torch.baddbmm(b_eF[experts.start : experts.stop].unsqueeze(1), x_eCD, w_eDF)


def _grouped_mlp(
    x_ND: Tensor,
    weight_N: Tensor | None,
    counts: list[int],
    w1_eDH: Tensor,
    w2_eFD: Tensor,
    b1_eH: Tensor | None,
    b2_eD: Tensor | None,
    activation: str,
) -> Tensor:
    """The same MLP as :class:`_ExpertMLP` on grouped rows, as two grouped GEMMs over all experts.

    A fixed number of kernels whatever the number of experts (a GPU would otherwise spend its time
    launching ~20 small kernels per expert); plain autograd does the backward, whose weight
    gradients are grouped GEMMs too. Each expert's block of rows starts on a 16-byte boundary (as
    torchtitan pads token groups): the weight-gradient GEMMs are grouped along the rows, and the
    kernels need aligned group offsets there. Padding rows are zero and their outputs are dropped.
    """
    num_rows = x_ND.shape[0]
    align = max(1, 16 // x_ND.element_size())
    padded = [-(-n // align) * align for n in counts]
    pos_N = None
    if padded != counts:  # the rows of expert j move by (padded start of j) - (start of j)
        device = x_ND.device
        shift_e = [p - s for p, s in zip(accumulate(padded, initial=0), accumulate(counts, initial=0))][:-1]
        shift_N = torch.repeat_interleave(
            torch.tensor(shift_e, device=device), torch.tensor(counts, device=device), output_size=num_rows
        )
        pos_N = torch.arange(num_rows, device=device) + shift_N
        x_ND = x_ND.new_zeros(sum(padded), x_ND.shape[1]).index_copy(0, pos_N, x_ND)
        if weight_N is not None:
            weight_N = weight_N.new_zeros(sum(padded)).index_copy(0, pos_N, weight_N)
    counts_e = torch.tensor(padded, device=x_ND.device)
    offs_e = torch.cumsum(counts_e, 0, dtype=torch.int32)

    grouped_mm = grouped_mm_op()
    h_NH = grouped_mm(x_ND, w1_eDH, offs=offs_e)
    if b1_eH is not None:
        h_NH = h_NH + b1_eH.repeat_interleave(counts_e, dim=0, output_size=x_ND.shape[0])
    a_NF = activate(h_NH, activation)
    scale_N1 = None if weight_N is None else weight_N.to(x_ND.dtype).unsqueeze(-1)
    scale_first = scale_N1 is not None and not _scale_output(w2_eFD)
    if scale_first:
        a_NF = a_NF * scale_N1
    out_ND = grouped_mm(a_NF, w2_eFD, offs=offs_e)
    if b2_eD is not None:
        b2_ND = b2_eD.repeat_interleave(counts_e, dim=0, output_size=x_ND.shape[0])
        out_ND = out_ND + (b2_ND * scale_N1 if scale_first else b2_ND)
    if scale_N1 is not None and not scale_first:
        out_ND = out_ND * scale_N1
    return out_ND if pos_N is None else out_ND.index_select(0, pos_N)


def grouped_mm_op():
    """torch's grouped GEMM: ``F.grouped_mm`` where torch has it, else the private ``torch._grouped_mm``
    that older releases (2.8 to 2.11) offer with the same arguments; None if neither exists."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_gemm_problem(x: Tensor, sizes: tuple[int, ...]) -> str | None:
    """Why torch's grouped GEMM cannot run the experts on activations like ``x``; None if it can.

    Its kernels want rows whose byte strides are multiples of 16 for every matrix size in ``sizes``
    (hidden, up-projection and FFN widths) and, on CUDA, bf16 on compute capability >= 8.0.
    """
    if grouped_mm_op() is None:
        return f"is missing: torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
    if x.is_cuda:
        if x.dtype != torch.bfloat16:
            return f"on CUDA it takes bfloat16 activations, not {x.dtype}"
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return f"on CUDA it needs compute capability >= 8.0, not {torch.cuda.get_device_capability(x.device)}"
    misaligned = [n for n in sizes if n * x.element_size() % 16]
    if misaligned:
        return f"rows of {misaligned} {x.dtype} elements are not multiples of 16 bytes"
    return None


def grouped_gemm_supported(x: Tensor, sizes: tuple[int, ...]) -> bool:
    """Whether ``expert_gemm="auto"`` picks the grouped GEMM: on a CUDA GPU where it can run."""
    return x.is_cuda and grouped_gemm_problem(x, sizes) is None


class GroupedExperts(nn.Module):
    """The ``num_local_experts`` experts held by this rank, weights stacked as ``[e, D, F]``.

    ``first_expert_id`` is the global id of local expert 0; each expert's initialisation is seeded by
    its global id, so the same model results from any expert-parallel layout. ``w1`` is drawn with
    ``init_std``, ``w2`` (the projection back into the residual stream) with ``output_init_std``
    (default ``init_std``; Megatron scales it by ``1/sqrt(2 * num_layers)``).
    """

    def __init__(
        self,
        num_local_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: Activation = "gelu",
        bias: bool = False,
        first_expert_id: int = 0,
        init_std: float = 0.02,
        init_seed: int = 1234,
        layer_number: int = 0,
        output_init_std: float | None = None,
        expert_gemm: ExpertGemm = "auto",
    ) -> None:
        super().__init__()
        self.num_local_experts = num_local_experts
        self.activation = activation
        self.expert_gemm = expert_gemm
        self.first_expert_id = first_expert_id
        self.init_std = init_std
        self.output_init_std = init_std if output_init_std is None else output_init_std
        self.init_seed = init_seed
        self.layer_number = layer_number
        up_size = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(num_local_experts, hidden_size, up_size))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, ffn_hidden_size, hidden_size))
        self.b1 = nn.Parameter(torch.empty(num_local_experts, up_size)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_local_experts, hidden_size)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for j in range(self.num_local_experts):
            gen = torch.Generator().manual_seed(
                expert_seed(self.init_seed, self.layer_number, self.first_expert_id + j)
            )
            for param, std in ((self.w1, self.init_std), (self.w2, self.output_init_std)):
                param[j].copy_(torch.empty(param.shape[1:]).normal_(0.0, std, generator=gen))
            for param in (self.b1, self.b2):
                if param is not None:
                    param[j].zero_()

    def forward(
        self,
        x: Tensor,
        tokens_per_expert: list[int],
        weight_N: Tensor | None = None,
        token_idx_N: Tensor | None = None,
        tokens_unique: bool | None = None,
    ) -> Tensor:
        """Run each local expert on its rows and return ``y`` (same shape as ``x``).

        Rows are grouped by expert, ``tokens_per_expert[j]`` each, and row i is scaled by
        ``weight_N[i]``. Without ``token_idx_N`` row i is ``x[i]`` and its output ``y[i]`` (rows
        delivered already grouped); with it, row i reads ``x[token_idx_N[i]]`` and adds into
        ``y[token_idx_N[i]]``, so ``y`` sums each token's weighted expert outputs.
        ``tokens_unique=True`` promises that no token appears twice in ``token_idx_N`` (top-1
        routing): the combine then writes instead of scatter-adding. None: ``self.tokens_unique``,
        which :class:`MoELayer` sets for top-1 routing. ``self.owns_output_grad = True`` (set by
        :class:`MoELayer` at EP > 1, whose dispatcher alone consumes ``y``) promises that the
        gradient reaching ``y`` is read by nothing else: without ``token_idx_N``, the loop then
        writes the input gradient over it.
        """
        if tokens_unique is None:
            tokens_unique = getattr(self, "tokens_unique", False)
        num_rows = x.shape[0] if token_idx_N is None else token_idx_N.shape[0]
        if sum(tokens_per_expert) != num_rows or len(tokens_per_expert) != self.num_local_experts:
            raise ValueError(
                f"tokens_per_expert={tokens_per_expert} must have {self.num_local_experts} entries "
                f"summing to the {num_rows} routed rows"
            )
        # Under autocast or mixed dtypes, compute in the activations' dtype; grads flow back through the cast.
        params = [None if p is None else p.to(x.dtype) for p in (self.w1, self.w2, self.b1, self.b2)]
        path = self.execution_path(x, tokens_per_expert)
        reuse_grad = getattr(self, "owns_output_grad", False)
        args = (tokens_per_expert, self.activation, tokens_unique, reuse_grad)
        if path in ("loop", "padded"):
            mlp = _ExpertMLP if path == "loop" else _PaddedExpertMLP
            return mlp.apply(x.contiguous(), weight_N, token_idx_N, *params, *args)
        with torch.autocast(x.device.type, enabled=False):
            x_ND = x if token_idx_N is None else x.index_select(0, token_idx_N)
            out_ND = _grouped_mlp(x_ND, weight_N, tokens_per_expert, *params, self.activation)
            if token_idx_N is None:
                return out_ND
            return torch.zeros_like(x).index_add_(0, token_idx_N, out_ND)

    def execution_path(self, x: Tensor, tokens_per_expert: list[int]) -> str:
        """``"grouped"``, ``"padded"`` or ``"loop"``: how a forward on ``x`` with these row counts runs.

        ``expert_gemm`` forces a path; ``"auto"`` takes the grouped GEMM on a CUDA GPU where it can
        run, else the choice of ``expert_cost.choose_expert_path`` (a cost model and a measurement on
        this machine) between the padded batched product and the per-expert loop.
        """
        if self.expert_gemm == "loop" or sum(tokens_per_expert) == 0:
            return "loop"
        if self.expert_gemm == "padded":
            return "padded"
        if self.uses_grouped_gemm(x):
            return "grouped"
        if x.is_cuda:
            return "loop"
        # Without autograd (evaluation, inference) only forwards run: they are what is measured.
        backward = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        step_s = self._path_timer(tokens_per_expert, x.dtype, backward)
        return choose_expert_path(
            tokens_per_expert, self.w1.shape[1], self.w2.shape[1], self.activation, x.dtype, step_s, backward
        )

    def _path_timer(self, tokens_per_expert: list[int], dtype: torch.dtype, backward: bool) -> Callable[[str], float]:
        """Seconds of one forward (+ backward) of a CPU path at these row counts: random rows, this
        layer's weights (detached: their gradients go nowhere), its own generator (torch's global RNG
        untouched), whatever inference, autocast or saved-tensor hooks mode the caller is in.
        The inputs are built on the first call, outside the timing."""
        inputs: list = []

        def step_s(path: str) -> float:
            # Identity hooks shadow any the caller set (activation checkpointing, offloading): this
            # graph is our own and is gone before the caller's forward goes on.
            with (
                torch.inference_mode(False),
                torch.set_grad_enabled(backward),
                torch.autocast("cpu", enabled=False),
                torch.autograd.graph.saved_tensors_hooks(_same, _same),
            ):
                if not inputs:
                    inputs.extend(self._timing_inputs(sum(tokens_per_expert), dtype))
                *operands, grad_ND = inputs
                mlp = _ExpertMLP if path == "loop" else _PaddedExpertMLP
                start = time.perf_counter()
                y_ND = mlp.apply(*operands, tokens_per_expert, self.activation, False, False)
                if backward:
                    y_ND.backward(grad_ND)
                seconds = time.perf_counter() - start
            for t in operands:
                if t is not None and t.requires_grad:
                    t.grad = None
            return seconds

        return step_s

    def _timing_inputs(self, rows: int, dtype: torch.dtype) -> list[Tensor | None]:
        gen = torch.Generator().manual_seed(0)
        x_ND = torch.randn(rows, self.w1.shape[1], generator=gen).to(dtype).requires_grad_()
        weight_N = torch.rand(rows, generator=gen).to(dtype).requires_grad_()
        token_idx_N = torch.randperm(rows, generator=gen)
        params = [
            None if p is None else p.detach().to(dtype).requires_grad_() for p in (self.w1, self.w2, self.b1, self.b2)
        ]
        grad_ND = torch.randn(x_ND.shape, generator=gen).to(dtype)
        return [x_ND, weight_N, token_idx_N, *params, grad_ND]

    def uses_grouped_gemm(self, x: Tensor) -> bool:
        """Whether a forward on ``x`` runs the grouped GEMM path (see ``MoEConfig.expert_gemm``)."""
        sizes = (self.w1.shape[1], self.w1.shape[2], self.w2.shape[1])
        if self.expert_gemm == "auto":
            if x.is_cuda and grouped_mm_op() is None:
                warnings.warn(
                    f"moe.expert_gemm='auto': torch's grouped GEMM {grouped_gemm_problem(x, sizes)}; "
                    "the experts fall back to the per-expert loop (slow on a GPU at many experts)",
                    stacklevel=3,
                )
            return grouped_gemm_supported(x, sizes)
        if self.expert_gemm in ("loop", "padded"):
            return False
        problem = grouped_gemm_problem(x, sizes)
        if problem is not None:
            raise ValueError(
                f"moe.expert_gemm='grouped' cannot run here: torch's grouped GEMM {problem}; "
                "use expert_gemm='auto' (it falls back to the per-expert loop) or 'loop'"
            )
        return True

    def extra_repr(self) -> str:
        e, d, h = self.w1.shape
        return (
            f"experts={e} (first global id {self.first_expert_id}), hidden={d}, up={h}, act={self.activation}, "
            f"gemm={self.expert_gemm}"
        )
