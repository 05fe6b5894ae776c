"""Attach an auxiliary loss to a layer's output so its gradient needs no extra pipeline traffic.

``y = attach_aux_loss(y, aux)`` is the identity in forward; in backward it passes ``grad_y`` through
and gives ``aux`` the gradient ``scale`` (d total_loss / d aux). The aux loss therefore reaches the
gradient on whatever pipeline stage its layer sits, while only the main activations cross stages.
"""

from __future__ import annotations

import torch
from torch import Tensor

_AUX_LOSS_GRAD_SCALE = 1.0


def set_aux_loss_grad_scale(scale: float) -> None:
    """Scale of the aux-loss gradient: the factor the main loss is multiplied by before backward.

    Engines set it to ``loss_scale / gradient_accumulation_steps`` (fp16 loss scaling and averaging
    over micro-batches apply to the aux loss as to the main loss). Default 1.0.
    """
    global _AUX_LOSS_GRAD_SCALE
    _AUX_LOSS_GRAD_SCALE = float(scale)


def get_aux_loss_grad_scale() -> float:
    return _AUX_LOSS_GRAD_SCALE


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output: Tensor, aux_loss: Tensor) -> Tensor:  # type: ignore[override]
        ctx.aux_shape = aux_loss.shape
        ctx.aux_dtype = aux_loss.dtype
        ctx.aux_device = aux_loss.device
        if torch.compiler.is_compiling():
            # AOTAutograd rebuilds an output that is a view of a graph input from that input, outside
            # the compiled function: the view would lose this backward, and with it the aux-loss gradient
            # (where a graph break puts ``output`` at the start of a graph). A copy is its own tensor.
            return output.clone()
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad_aux = torch.full(ctx.aux_shape, _AUX_LOSS_GRAD_SCALE, dtype=ctx.aux_dtype, device=ctx.aux_device)
        return grad_output, grad_aux


def attach_aux_loss(output: Tensor, aux_loss: Tensor) -> Tensor:
    """Identity on ``output`` whose backward also back-propagates ``aux_loss`` (scaled, see above)."""
    return _AttachAuxLoss.apply(output, aux_loss)
