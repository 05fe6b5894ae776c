"""The per-expert loop: two GEMMs per local expert on its contiguous block of grouped rows (CPU)."""

from __future__ import annotations

import torch
from torch import Tensor

from .activations import DEFAULT_CLAMP, activate, activate_backward, activate_for_backward, linear, release, released
from .buffers import grad_buffer_like


def row_blocks(counts: list[int]) -> list[slice]:
    """Each expert's block of rows (possibly empty), in expert order."""
    blocks, start = [], 0
    for n in counts:
        blocks.append(slice(start, start + n))
        start += n
    return blocks


def _unbind(param: Tensor | None) -> tuple[Tensor, ...] | None:
    return None if param is None else param.unbind(0)


class LoopExpertMLP(torch.autograd.Function):
    """``y[i] = act(x[i] @ W1[j] + b1[j]) @ W2[j] + b2[j]`` for every row i of expert j.

    Rows are grouped by expert, ``counts[j]`` each; rows past ``sum(counts)`` are padding whose
    output (and input gradient) is zero. Only the pre-activation is saved, per expert (and freed
    expert by expert in backward); backward recomputes the activation from it. Per-expert tensors
    rather than one ``[N, F]`` buffer let the allocator reuse warm memory from step to step.

    ``reuse_grad``: the caller owns the output's gradient and nothing else reads it, so the input
    gradient is written over it in place, one ``[N, D]`` buffer less at backward's peak.
    ``clamp``: the :class:`~moe_parallel.experts.activations.SwiGLUClamp` of ``clamped_swiglu``.
    """

    @staticmethod
    def forward(ctx, x, w1_eDH, w2_eFD, b1_eH, b2_eD, counts, activation, reuse_grad=False, clamp=DEFAULT_CLAMP):  # type: ignore[override]
        # The caller cast everything to the activations' dtype; autocast must not recast the products.
        with torch.autocast(x.device.type, enabled=False):
            rows = row_blocks(counts)
            w1, w2, b1, b2 = (_unbind(p) for p in (w1_eDH, w2_eFD, b1_eH, b2_eD))
            y = torch.empty_like(x)
            y[sum(counts) :].zero_()
            saved: list[Tensor] = []
            for j, n in enumerate(counts):
                if n == 0:
                    continue
                h = linear(x[rows[j]], w1[j], None if b1 is None else b1[j])
                saved.append(h)  # a is recomputed in backward
                linear(activate(h, activation, clamp), w2[j], None if b2 is None else b2[j], out=y[rows[j]])
        ctx.save_for_backward(x, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved)
        ctx.counts, ctx.activation, ctx.reuse_grad, ctx.clamp = counts, activation, reuse_grad, clamp
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        with torch.autocast(grad_y.device.type, enabled=False):
            return LoopExpertMLP._backward(ctx, grad_y.contiguous())

    @staticmethod
    def _backward(ctx, grad_y):
        x, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved = ctx.saved_tensors
        counts, activation, clamp = ctx.counts, ctx.activation, ctx.clamp
        rows = row_blocks(counts)
        # Expert j's rows of grad_y are last read before its rows of grad_x are written.
        grad_x = grad_y if ctx.reuse_grad else torch.empty_like(x)
        grad_x[sum(counts) :].zero_()
        # Weight gradients are [e, D, F] tensors every step: recycled memory spares their page faults.
        grads = [None if p is None else grad_buffer_like(p) for p in (w1_eDH, w2_eFD, b1_eH, b2_eD)]
        grad_w1, grad_w2, grad_b1, grad_b2 = (_unbind(g) for g in grads)
        w1, w2, b1, b2 = (_unbind(p) for p in (w1_eDH, w2_eFD, b1_eH, b2_eD))
        saved_rows = iter(saved)
        for j, n in enumerate(counts):
            if n == 0:  # no rows: zero gradients
                for grad in (grad_w1, grad_w2, grad_b1, grad_b2):
                    if grad is not None:
                        grad[j].zero_()
                continue
            h = next(saved_rows)
            x_e = x[rows[j]]
            if released(h):  # a second backward through a retained graph: recompute what was freed
                h = linear(x_e, w1[j], None if b1 is None else b1[j])
            a, gate_act = activate_for_backward(h, activation, clamp)
            g = grad_y[rows[j]]
            # Beside h, one [n, F] tensor (a, then grad_a in its memory; gated: and the gate's
            # activated half); grad_h overwrites grad_a, or for the gated activations h itself.
            torch.mm(a.t(), g, out=grad_w2[j])
            if grad_b2 is not None:
                torch.sum(g, 0, out=grad_b2[j])
            grad_a = torch.mm(g, w2[j].t(), out=a)
            grad_h = activate_backward(grad_a, h, activation, in_place=True, gate_act=gate_act, clamp=clamp)
            del a, grad_a, gate_act
            if not grad_h.is_set_to(h):  # else grad_h lives in h's memory: released after its last use
                release(h)
            torch.mm(x_e.t(), grad_h, out=grad_w1[j])
            if grad_b1 is not None:
                torch.sum(grad_h, 0, out=grad_b1[j])
            torch.mm(grad_h, w1[j].t(), out=grad_x[rows[j]])
            release(h)  # (a no-op when it is released already)
        return grad_x, *grads, None, None, None, None
