"""The grouped-GEMM path: each of the MLP's two products is one grouped GEMM over all local experts.

Group sizes stay on the device (``offs``, an int32 cumulative sum of the rows per expert), so this
path never waits for the host: a fixed number of kernels whatever the number of experts, no host
sync, static shapes, and ``torch.compile(fullgraph=True)`` traces it. Rows past the last group are
padding (dropped assignments the dispatcher did not count); their outputs and input gradients are
zero.

The GEMM is wrapped as the custom op ``moe_parallel::grouped_mm``: torch's kernel exists for CPU
float32 and CUDA bfloat16, but its meta function (what ``torch.compile`` traces) admits bfloat16
only, and its row strides must be multiples of 16 bytes. The op has its own fake implementation and
pads misaligned widths with zero columns, so one path serves every dtype and shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import DEFAULT_CLAMP, SwiGLUClamp, activate

# CUDA's weight-gradient kernels group along the rows: each group must start on a 16-byte boundary.
_ROW_ALIGN_BYTES = 16


def grouped_mm_op():
    """torch's grouped GEMM: ``F.grouped_mm`` where torch has it, else the private ``torch._grouped_mm``
    that older releases (2.8 to 2.11) offer with the same arguments; None if neither exists."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_gemm_problem(x: Tensor, sizes: tuple[int, ...] = ()) -> str | None:
    """Why torch's grouped GEMM cannot run the experts on activations like ``x``; None if it can.

    On CUDA it takes bf16 on compute capability >= 8.0; on CPU any floating dtype torch's kernel
    takes. Misaligned widths in ``sizes`` are padded by :func:`grouped_mm`, so they are no problem.
    """
    if grouped_mm_op() is None:
        return f"is missing: torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
    if x.is_cuda:
        if x.dtype != torch.bfloat16:
            return f"on CUDA it takes bfloat16 activations, not {x.dtype}"
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return f"on CUDA it needs compute capability >= 8.0, not {torch.cuda.get_device_capability(x.device)}"
    elif x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"on CPU it takes float32, bfloat16 or float16, not {x.dtype}"
    return None


def grouped_gemm_supported(x: Tensor, sizes: tuple[int, ...] = ()) -> bool:
    """Whether ``expert_gemm="auto"`` picks the grouped GEMM: on a CUDA GPU where it can run."""
    return x.is_cuda and grouped_gemm_problem(x, sizes) is None


def _pad_last(t: Tensor, size: int) -> Tensor:
    return t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


def _aligned(n: int, elem_bytes: int) -> int:
    step = max(1, _ROW_ALIGN_BYTES // elem_bytes)
    return -(-n // step) * step


def _rows_past_groups(num_rows: int, offs: Tensor, device: torch.device) -> Tensor:
    """``[num_rows, 1]`` bool: rows at or past the end of the last group."""
    return (torch.arange(num_rows, device=device) >= offs[-1]).unsqueeze(-1)


def _mm_rows(a_MK: Tensor, b_eKN: Tensor, offs: Tensor) -> Tensor:
    """Row-grouped ``a_MK @ b_eKN[g]`` for the rows of group g; rows past the groups zero."""
    elem = a_MK.element_size()
    k, n = b_eKN.shape[-2:]
    k_pad, n_pad = _aligned(k, elem), _aligned(n, elem)
    a = _pad_last(a_MK, k_pad)
    b = b_eKN
    if (k_pad, n_pad) != (k, n):
        b = F.pad(b_eKN, (0, n_pad - n, 0, k_pad - k))
    elif b.stride(-1) != 1 and b.stride(-2) * elem % _ROW_ALIGN_BYTES:
        b = b.contiguous()
    out = grouped_mm_op()(a, b, offs=offs)[:, :n]
    return out.masked_fill(_rows_past_groups(out.shape[0], offs, out.device), 0)


def _row_group_index(offs: Tensor, num_rows: int) -> Tensor:
    """Group of every row (``len(offs)`` for rows past the last group)."""
    rows = torch.arange(num_rows, device=offs.device, dtype=offs.dtype)
    return torch.searchsorted(offs, rows, right=True)


def _align_row_groups(a_MK: Tensor, g_MN: Tensor, offs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Copies of ``a_MK`` and ``g_MN`` with every group starting on an aligned row (zero rows
    between), and the new offsets; static shapes (``M + groups * (align - 1)`` rows)."""
    align = max(1, _ROW_ALIGN_BYTES // a_MK.element_size())
    num_rows, groups = a_MK.shape[0], offs.numel()
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()
    padded_counts = (counts + align - 1) // align * align
    padded_offs = torch.cumsum(padded_counts, 0)
    shift_G = (padded_offs - padded_counts) - (offs.long() - counts)
    group_M = _row_group_index(offs, num_rows)
    bound = num_rows + groups * (align - 1)
    # Rows past the groups go to one spare row past the bound, dropped below.
    pos_M = torch.where(
        group_M < groups, torch.arange(num_rows, device=offs.device) + shift_G[group_M.clamp(max=groups - 1)], bound
    )
    a = a_MK.new_zeros(bound + 1, a_MK.shape[1]).index_copy_(0, pos_M, a_MK)[:bound]
    g = g_MN.new_zeros(bound + 1, g_MN.shape[1]).index_copy_(0, pos_M, g_MN)[:bound]
    return a, g, padded_offs.to(offs.dtype)


def _mm_weight_grad(a_MK: Tensor, g_MN: Tensor, offs: Tensor, num_groups: int) -> Tensor:
    """``[e, K, N]``: ``a_MK[rows of g].T @ g_MN[rows of g]`` per group (zero for an empty group)."""
    k, n = a_MK.shape[1], g_MN.shape[1]
    elem = a_MK.element_size()
    a, g = _pad_last(a_MK, _aligned(k, elem)), _pad_last(g_MN, _aligned(n, elem))
    if a_MK.is_cuda:
        a, g, offs = _align_row_groups(a, g, offs)
    return grouped_mm_op()(a.t(), g, offs=offs)[:, :k, :n]


@torch.library.custom_op("moe_parallel::grouped_mm", mutates_args=())
def grouped_mm(a_MK: Tensor, b_eKN: Tensor, offs: Tensor) -> Tensor:
    """Row-grouped GEMM: rows ``[offs[g-1], offs[g])`` of ``a_MK`` times ``b_eKN[g]``; rows past
    ``offs[-1]`` give zero rows. ``offs``: integer ends of the groups (a device tensor)."""
    return _mm_rows(a_MK, b_eKN, offs.to(torch.int32))


@grouped_mm.register_fake
def _(a_MK: Tensor, b_eKN: Tensor, offs: Tensor) -> Tensor:
    return a_MK.new_empty(a_MK.shape[0], b_eKN.shape[-1])


@torch.library.custom_op("moe_parallel::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(a_MK: Tensor, g_MN: Tensor, offs: Tensor, num_groups: int) -> Tensor:
    """The weight gradient of :func:`grouped_mm`: ``[e, K, N]``, one product per group of rows."""
    return _mm_weight_grad(a_MK, g_MN, offs.to(torch.int32), num_groups)


@grouped_mm_weight_grad.register_fake
def _(a_MK: Tensor, g_MN: Tensor, offs: Tensor, num_groups: int) -> Tensor:
    return a_MK.new_empty(num_groups, a_MK.shape[1], g_MN.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    a_MK, b_eKN, offs = inputs
    ctx.save_for_backward(a_MK, b_eKN, offs)


def _backward(ctx, grad_MN):
    a_MK, b_eKN, offs = ctx.saved_tensors
    grad_a = grouped_mm(grad_MN.contiguous(), b_eKN.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_b = None
    if ctx.needs_input_grad[1]:
        grad_b = grouped_mm_weight_grad(a_MK, grad_MN.contiguous(), offs, b_eKN.shape[0])
    return grad_a, grad_b, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)


def grouped_mlp(
    x_MD: Tensor,
    tokens_per_expert_e: Tensor,
    w1_eDH: Tensor,
    w2_eFD: Tensor,
    b1_eH: Tensor | None,
    b2_eD: Tensor | None,
    activation: str,
    clamp: SwiGLUClamp = DEFAULT_CLAMP,
) -> Tensor:
    """The experts' MLP on grouped rows as two grouped GEMMs; rows past ``tokens_per_expert_e.sum()``
    are padding and give zero rows. Plain autograd does the backward (grouped GEMMs too).
    ``clamp``: the constants of ``clamped_swiglu``."""
    offs_e = torch.cumsum(tokens_per_expert_e, 0, dtype=torch.int32)
    h_MH = grouped_mm(x_MD, w1_eDH, offs_e)
    expert_M = None
    if b1_eH is not None or b2_eD is not None:  # each row's expert, to add its bias
        expert_M = _row_group_index(offs_e, x_MD.shape[0]).clamp(max=w1_eDH.shape[0] - 1)
    if b1_eH is not None:
        h_MH = h_MH + b1_eH.index_select(0, expert_M)
    out_MD = grouped_mm(activate(h_MH, activation, clamp), w2_eFD, offs_e)
    if b2_eD is not None:
        past_M1 = _rows_past_groups(x_MD.shape[0], offs_e, x_MD.device)
        out_MD = out_MD + b2_eD.index_select(0, expert_M).masked_fill(past_M1, 0)
    return out_MD
