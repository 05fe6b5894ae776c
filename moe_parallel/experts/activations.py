"""The experts' activations and their backward, written in place where the activation allows it.

The gated activations (``swiglu``, ``clamped_swiglu``) split the pre-activation ``h`` into its
``[gate | up]`` halves. ``clamped_swiglu`` is GPT-OSS's: with ``g = clamp(gate, max=limit)`` and
``u = clamp(up, -limit, limit)``, ``a = (u + 1) * g * sigmoid(alpha * g)``; its ``limit`` and ``alpha``
travel as a :class:`SwiGLUClamp`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

aten = torch.ops.aten

GATED_ACTIVATIONS = ("swiglu", "clamped_swiglu")


class SwiGLUClamp(NamedTuple):
    """The constants of ``clamped_swiglu`` (GPT-OSS's defaults)."""

    limit: float = 7.0
    alpha: float = 1.702


DEFAULT_CLAMP = SwiGLUClamp()


def is_gated(activation: str) -> bool:
    """Whether ``activation`` reads ``[gate | up]`` halves (the first product is twice as wide)."""
    return activation in GATED_ACTIVATIONS


def up_width(activation: str, ffn_hidden_size: int) -> int:
    """Width of the first product's output: ``2 * ffn_hidden_size`` for the gated activations."""
    return 2 * ffn_hidden_size if is_gated(activation) else ffn_hidden_size


def _clamped_glu(gate: Tensor, clamp: SwiGLUClamp) -> Tensor:
    g = gate.clamp(max=clamp.limit)
    return g * torch.sigmoid(clamp.alpha * g)


def activate(h: Tensor, activation: str, clamp: SwiGLUClamp = DEFAULT_CLAMP) -> Tensor:
    """The experts' activation; the gated ones split ``h`` into (gate, up) halves."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "silu":
        return F.silu(h)
    gate, up = h.chunk(2, dim=-1)
    if activation == "clamped_swiglu":
        return (up.clamp(-clamp.limit, clamp.limit) + 1) * _clamped_glu(gate, clamp)
    return F.silu(gate) * up


_ELEMENTWISE_BACKWARD = {
    "gelu": (aten.gelu_backward, ()),
    "relu": (aten.threshold_backward, (0,)),
    "silu": (aten.silu_backward, ()),
}


def activate_for_backward(
    h: Tensor, activation: str, clamp: SwiGLUClamp = DEFAULT_CLAMP
) -> tuple[Tensor, Tensor | None]:
    """The activation recomputed in backward, and what :func:`activate_backward` reuses of it: the
    gate's activated half (``silu(gate)`` for ``swiglu``, ``g * sigmoid(alpha * g)`` for
    ``clamped_swiglu``); None for the elementwise activations."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        return silu_gate * up, silu_gate
    if activation == "clamped_swiglu":
        gate, up = h.chunk(2, dim=-1)
        glu = _clamped_glu(gate, clamp)
        return (up.clamp(-clamp.limit, clamp.limit) + 1) * glu, glu
    return activate(h, activation), None


def _alias(h: Tensor) -> Tensor:
    # h is a tensor saved for backward: write through an alias with a version counter of its own, so
    # that autograd's check of saved tensors still passes (the caller releases h's memory after use,
    # and a second backward through a retained graph recomputes it).
    return h.new_empty(0).set_(h.untyped_storage(), h.storage_offset(), h.shape, h.stride())


def activate_backward(
    grad_a: Tensor,
    h: Tensor,
    activation: str,
    in_place: bool = False,
    gate_act: Tensor | None = None,
    clamp: SwiGLUClamp = DEFAULT_CLAMP,
) -> Tensor:
    """``dL/dh`` from ``dL/da``.

    ``in_place``: an elementwise activation writes it over ``grad_a``; the gated ones write it into
    ``h``'s memory (as large as ``dL/dh``), so ``h`` no longer holds the pre-activation afterwards:
    the caller releases it (:func:`release`) once done with the result. ``clamped_swiglu`` also
    overwrites ``grad_a`` and ``gate_act``, which the caller drops after this call.
    ``gate_act``: the gate's activated half from :func:`activate_for_backward`, not computed again.
    """
    if activation in _ELEMENTWISE_BACKWARD:
        op, args = _ELEMENTWISE_BACKWARD[activation]
        return op.grad_input(grad_a, h, *args, grad_input=grad_a) if in_place else op(grad_a, h, *args)
    if activation == "clamped_swiglu":
        return _clamped_swiglu_backward(grad_a, h, in_place, gate_act, clamp)
    gate, up = h.chunk(2, dim=-1)
    if gate_act is None:
        gate_act = F.silu(gate)
    if not in_place:
        return torch.cat([aten.silu_backward(grad_a * up, gate), grad_a * gate_act], dim=-1)
    grad_h = _alias(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    # Each op reads a half of h before it overwrites it with that half's gradient.
    torch.mul(grad_a, up, out=grad_up)  # dL/d(silu(gate)) = dL/da * up
    aten.silu_backward.grad_input(grad_up, gate, grad_input=grad_gate)  # dL/dgate
    torch.mul(grad_a, gate_act, out=grad_up)  # dL/dup = dL/da * silu(gate)
    return grad_h


def _clamped_swiglu_backward(
    grad_a: Tensor, h: Tensor, in_place: bool, glu: Tensor | None, clamp: SwiGLUClamp
) -> Tensor:
    """``dL/dh`` of ``clamped_swiglu``. With ``g = clamp(gate, max=L)``, ``s = sigmoid(alpha * g)``,
    ``u = clamp(up, -L, L)``:

        dL/dgate = dL/da * (u + 1) * s * (1 + alpha * g * (1 - s))   where gate <= L, else 0
        dL/dup   = dL/da * g * s                                      where |up| <= L, else 0

    (the clamps pass the gradient on their closed interval, as ``torch.clamp`` does).
    """
    limit, alpha = clamp.limit, clamp.alpha
    gate, up = h.chunk(2, dim=-1)
    if glu is None:
        glu = _clamped_glu(gate, clamp)
    if not in_place:
        g = gate.clamp(max=limit)
        s = torch.sigmoid(alpha * g)
        d_glu = s * (1 + alpha * g * (1 - s))
        grad_gate = (grad_a * (up.clamp(-limit, limit) + 1) * d_glu).masked_fill(gate > limit, 0)
        grad_up = (grad_a * glu).masked_fill(up.abs() > limit, 0)
        return torch.cat([grad_gate, grad_up], dim=-1)
    # Within h, grad_a and glu (all three consumed): each step reads what it needs before a later
    # step overwrites it; only boolean masks are allocated.
    grad_h = _alias(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    glu.mul_(grad_a).masked_fill_(up.abs() > limit, 0)  # dL/dup, parked in glu's memory
    grad_a.mul_(grad_up.clamp_(-limit, limit).add_(1))  # dL/da * (u + 1); up is read for the last time
    torch.clamp(gate, max=limit, out=grad_up).mul_(alpha).sigmoid_()  # s, in up's memory
    gate_above = gate > limit
    grad_gate.clamp_(max=limit).mul_(alpha)  # alpha * g
    grad_gate.addcmul_(grad_gate, grad_up, value=-1).add_(1).mul_(grad_up)  # s * (1 + alpha * g * (1 - s))
    grad_gate.mul_(grad_a).masked_fill_(gate_above, 0)
    grad_up.copy_(glu)
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
