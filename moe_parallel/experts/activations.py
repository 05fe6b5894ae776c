"""The experts' activations and their backward, written in place where the activation allows it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

aten = torch.ops.aten


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


def activate_for_backward(h: Tensor, activation: str) -> tuple[Tensor, Tensor | None]:
    """The activation recomputed in backward, and what :func:`activate_backward` reuses of it
    (``silu(gate)`` for ``swiglu``; None otherwise)."""
    if activation != "swiglu":
        return activate(h, activation), None
    gate, up = h.chunk(2, dim=-1)
    silu_gate = F.silu(gate)
    return silu_gate * up, silu_gate


def activate_backward(
    grad_a: Tensor, h: Tensor, activation: str, in_place: bool = False, silu_gate: Tensor | None = None
) -> Tensor:
    """``dL/dh`` from ``dL/da``.

    ``in_place``: an elementwise activation writes it over ``grad_a``; ``swiglu`` writes it into
    ``h``'s memory (as large as ``dL/dh``), so ``h`` no longer holds the pre-activation afterwards:
    the caller releases it (:func:`release`) once done with the result.
    ``silu_gate``: ``silu(gate)`` from :func:`activate_for_backward`, not computed again.
    """
    if activation in _ELEMENTWISE_BACKWARD:
        op, args = _ELEMENTWISE_BACKWARD[activation]
        return op.grad_input(grad_a, h, *args, grad_input=grad_a) if in_place else op(grad_a, h, *args)
    gate, up = h.chunk(2, dim=-1)
    if silu_gate is None:
        silu_gate = F.silu(gate)
    if not in_place:
        return torch.cat([aten.silu_backward(grad_a * up, gate), grad_a * silu_gate], dim=-1)
    # h is a tensor saved for backward: write through an alias with a version counter of its own, so
    # that autograd's check of saved tensors still passes (the caller releases h's memory after use,
    # and a second backward through a retained graph recomputes it).
    grad_h = h.new_empty(0).set_(h.untyped_storage(), h.storage_offset(), h.shape, h.stride())
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    # Each op reads a half of h before it overwrites it with that half's gradient.
    torch.mul(grad_a, up, out=grad_up)  # dL/d(silu(gate)) = dL/da * up
    aten.silu_backward.grad_input(grad_up, gate, grad_input=grad_gate)  # dL/dgate
    torch.mul(grad_a, silu_gate, out=grad_up)  # dL/dup = dL/da * silu(gate)
    return grad_h


def release(saved: Tensor) -> None:
    """Free a saved intermediate's memory now, not when backward returns: every expert's saved
    pre-activation would otherwise live beside the whole stacked weight gradient at the end of
    backward, the step's peak at large experts."""
    saved.untyped_storage().resize_(0)


def released(saved: Tensor) -> bool:
    return saved.numel() > 0 and saved.untyped_storage().nbytes() == 0


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    if bias is None:
        return torch.mm(x, weight, out=out)
    return torch.addmm(bias, x, weight, out=out)
