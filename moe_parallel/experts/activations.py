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


def activate_backward(grad_a: Tensor, h: Tensor, activation: str, in_place: bool = False) -> Tensor:
    """``dL/dh`` from ``dL/da``; ``in_place``: written over ``grad_a`` where the activation allows it."""
    if activation in _ELEMENTWISE_BACKWARD:
        op, args = _ELEMENTWISE_BACKWARD[activation]
        return op.grad_input(grad_a, h, *args, grad_input=grad_a) if in_place else op(grad_a, h, *args)
    gate, up = h.chunk(2, dim=-1)
    silu_gate = F.silu(gate)
    return torch.cat([aten.silu_backward(grad_a * up, gate), grad_a * silu_gate], dim=-1)


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
