"""Local experts as one module with stacked weights, run as a grouped MLP over routed tokens only.

Tokens arrive sorted by local expert, ``tokens_per_expert[j]`` rows each, so every expert is two
matrix products on a contiguous slice: capacity bounds the buffers, it never adds FLOPs. The combine
weight is folded into the expert (``(w * a) @ W2 == w * (a @ W2)``, one row scale over min(D, F)
columns), and the activation is recomputed in backward from the pre-activation instead of being
stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Activation

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


def _activate_backward(grad_a: Tensor, h: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return aten.gelu_backward(grad_a, h)
    if activation == "relu":
        return aten.threshold_backward(grad_a, h, 0)
    if activation == "silu":
        return aten.silu_backward(grad_a, h)
    gate, up = h.chunk(2, dim=-1)
    silu_gate = F.silu(gate)
    return torch.cat([aten.silu_backward(grad_a * up, gate), grad_a * silu_gate], dim=-1)


def _expert_slices(counts: list[int]) -> list[tuple[int, slice]]:
    """(local expert, its rows) for every expert that received at least one row."""
    slices, start = [], 0
    for j, n in enumerate(counts):
        if n > 0:
            slices.append((j, slice(start, start + n)))
        start += n
    return slices


def _empty_grad(param: Tensor | None, slices: list[tuple[int, slice]]) -> Tensor | None:
    """Uninitialised gradient of a stacked ``[e, ...]`` parameter; experts without rows get zeros."""
    if param is None:
        return None
    grad = torch.empty_like(param)
    filled = {j for j, _ in slices}
    for j in range(param.shape[0]):
        if j not in filled:
            grad[j].zero_()
    return grad


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    if bias is None:
        return torch.mm(x, weight, out=out)
    return torch.addmm(bias, x, weight, out=out)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products, accumulated in float32."""
    return (a.float() * b.float()).sum(-1)


class _GroupedMLP(torch.autograd.Function):
    """out[s_j:s_j+n_j] = w ⊙ (act(x_j @ W1[j] + b1[j]) @ W2[j] + b2[j]) for each local expert j.

    The row scale ``w`` goes on the narrower side of the second product. When D <= F it scales the
    ``[n, D]`` output, and the unscaled output ``o`` is kept for backward: ``dL/dw = <g, o>`` is then
    a dot over D, and ``w ⊙ g`` feeds both weight-gradient products, so no ``[n, F]`` pass is spent
    on the scale. When D > F it scales the ``[n, F]`` activation in place. Tensors are saved per
    expert (not as one ``[N, F]`` buffer): the allocator then reuses warm memory from step to step
    instead of mapping (and page-faulting) a fresh buffer of hundreds of MiB each time.
    """

    @staticmethod
    def forward(ctx, x_ND, weight_N, w1_eDH, w2_eFD, b1_eH, b2_eD, counts, activation):  # type: ignore[override]
        # The caller already cast everything to the activations' dtype; autocast must not recast
        # the products (it would also clash with the preallocated ``out=`` buffers).
        with torch.autocast(x_ND.device.type, enabled=False):
            return _GroupedMLP._forward(ctx, x_ND, weight_N, w1_eDH, w2_eFD, b1_eH, b2_eD, counts, activation)

    @staticmethod
    def _forward(ctx, x_ND, weight_N, w1_eDH, w2_eFD, b1_eH, b2_eD, counts, activation):
        out_ND = x_ND.new_empty(x_ND.shape[0], w2_eFD.shape[-1])
        scale_N1 = None if weight_N is None else weight_N.to(x_ND.dtype).unsqueeze(-1)
        scale_output = scale_N1 is not None and w2_eFD.shape[-1] <= w2_eFD.shape[-2]
        slices = _expert_slices(counts)
        h_list, o_list = [], []
        for j, rows in slices:
            h = _linear(x_ND[rows], w1_eDH[j], None if b1_eH is None else b1_eH[j])
            h_list.append(h)
            a = activate(h, activation)
            b2 = None if b2_eD is None else b2_eD[j]
            if scale_N1 is None:
                _linear(a, w2_eFD[j], b2, out=out_ND[rows])
            elif scale_output:
                o = _linear(a, w2_eFD[j], b2)
                o_list.append(o)
                torch.mul(o, scale_N1[rows], out=out_ND[rows])
            else:
                s = scale_N1[rows]
                # activate() returns a new tensor: scaling it in place leaves the saved h intact.
                _linear(a.mul_(s), w2_eFD[j], None if b2 is None else s * b2, out=out_ND[rows])
        ctx.save_for_backward(x_ND, weight_N, w1_eDH, w2_eFD, b1_eH, b2_eD, *h_list, *o_list)
        ctx.slices = slices
        ctx.activation = activation
        return out_ND

    @staticmethod
    def backward(ctx, grad_out_ND):  # type: ignore[override]
        with torch.autocast(grad_out_ND.device.type, enabled=False):
            return _GroupedMLP._backward(ctx, grad_out_ND)

    @staticmethod
    def _backward(ctx, grad_out_ND):
        x_ND, weight_N, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved = ctx.saved_tensors
        activation, slices = ctx.activation, ctx.slices
        h_list, o_list = saved[: len(slices)], saved[len(slices) :]
        grad_out_ND = grad_out_ND.contiguous()
        grad_x_ND = torch.empty_like(x_ND)
        grad_w1, grad_w2 = _empty_grad(w1_eDH, slices), _empty_grad(w2_eFD, slices)
        grad_b1, grad_b2 = _empty_grad(b1_eH, slices), _empty_grad(b2_eD, slices)
        grad_weight_N = None if weight_N is None else torch.empty_like(weight_N)
        scale_N1 = None if weight_N is None else weight_N.to(x_ND.dtype).unsqueeze(-1)
        for i, (j, rows) in enumerate(slices):
            h, g = h_list[i], grad_out_ND[rows]
            a = activate(h, activation)
            if scale_N1 is None:
                g_b2 = g  # gradient of the second product's output (and of b2)
                grad_a = g @ w2_eFD[j].t()
                torch.mm(a.t(), g, out=grad_w2[j])
            elif o_list:  # the scale is on the output: o = a @ W2 + b2 was kept
                dot = _row_dot(g, o_list[i])
                g_b2 = g * scale_N1[rows]
                grad_a = g_b2 @ w2_eFD[j].t()
                torch.mm(a.t(), g_b2, out=grad_w2[j])
            else:  # the scale is on the activation: out = (s * a) @ W2 + s * b2
                s = scale_N1[rows]
                grad_a = g @ w2_eFD[j].t()
                dot = _row_dot(grad_a, a)
                if b2_eD is not None:
                    dot = dot + g.float() @ b2_eD[j].float()
                g_b2 = None if b2_eD is None else g * s
                torch.mm(a.mul_(s).t(), g, out=grad_w2[j])
                grad_a.mul_(s)
            if scale_N1 is not None:
                grad_weight_N[rows] = dot.to(grad_weight_N.dtype)
            if grad_b2 is not None:
                grad_b2[j] = g_b2.sum(0)
            grad_h = _activate_backward(grad_a, h, activation)
            torch.mm(x_ND[rows].t(), grad_h, out=grad_w1[j])
            if grad_b1 is not None:
                grad_b1[j] = grad_h.sum(0)
            torch.mm(grad_h, w1_eDH[j].t(), out=grad_x_ND[rows])
        return grad_x_ND, grad_weight_N, grad_w1, grad_w2, grad_b1, grad_b2, None, None


class _RoutedGroupedMLP(torch.autograd.Function):
    """y_TD = sum over kept assignments i of w_i * expert_{e(i)}(x_TD[t(i)]), one expert at a time.

    The single-rank path: each expert gathers its own rows from ``x_TD`` into a small buffer and
    scatter-adds its weighted output straight into ``y_TD`` (backward likewise), so no ``[N, D]``
    routed buffer is ever built. Each expert's rows stay in cache between the gather, the two
    products and the scatter-add, where a whole-batch gather and scatter would stream ``N x D``
    through memory four times. The row scale goes on the narrower side, as in :class:`_GroupedMLP`.
    """

    @staticmethod
    def forward(ctx, x_TD, weight_N, token_idx_N, w1_eDH, w2_eFD, b1_eH, b2_eD, counts, activation):  # type: ignore[override]
        with torch.autocast(x_TD.device.type, enabled=False):
            y_TD = torch.zeros_like(x_TD, memory_format=torch.contiguous_format)
            scale_N1 = weight_N.to(x_TD.dtype).unsqueeze(-1)
            keep_output = w2_eFD.shape[-1] <= w2_eFD.shape[-2]  # D <= F: scale the [n, D] output
            slices = _expert_slices(counts)
            saved: list[Tensor] = []
            for j, rows in slices:
                idx, s = token_idx_N[rows], scale_N1[rows]
                h = _linear(x_TD.index_select(0, idx), w1_eDH[j], None if b1_eH is None else b1_eH[j])
                a = activate(h, activation)  # a fresh tensor: scaling it in place keeps h intact
                b2 = None if b2_eD is None else b2_eD[j]
                if keep_output:
                    o = _linear(a, w2_eFD[j], b2)
                    saved += [h, o]
                    y_TD.index_add_(0, idx, o * s)
                else:
                    saved.append(h)
                    y_TD.index_add_(0, idx, _linear(a.mul_(s), w2_eFD[j], None if b2 is None else s * b2))
        ctx.save_for_backward(x_TD, weight_N, token_idx_N, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved)
        ctx.slices, ctx.activation, ctx.keep_output = slices, activation, keep_output
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):  # type: ignore[override]
        with torch.autocast(grad_y_TD.device.type, enabled=False):
            return _RoutedGroupedMLP._backward(ctx, grad_y_TD.contiguous())

    @staticmethod
    def _backward(ctx, grad_y_TD):
        x_TD, weight_N, token_idx_N, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved = ctx.saved_tensors
        slices, activation, keep_output = ctx.slices, ctx.activation, ctx.keep_output
        per_expert = 2 if keep_output else 1
        grad_x_TD = torch.zeros_like(x_TD)
        grad_w1, grad_w2 = _empty_grad(w1_eDH, slices), _empty_grad(w2_eFD, slices)
        grad_b1, grad_b2 = _empty_grad(b1_eH, slices), _empty_grad(b2_eD, slices)
        grad_weight_N = torch.empty_like(weight_N)
        scale_N1 = weight_N.to(x_TD.dtype).unsqueeze(-1)
        for i, (j, rows) in enumerate(slices):
            idx, s = token_idx_N[rows], scale_N1[rows]
            h = saved[per_expert * i]
            g = grad_y_TD.index_select(0, idx)
            a = activate(h, activation)
            if keep_output:  # out = s * o: dL/dw = <g, o>; s * g feeds both weight gradients
                grad_weight_N[rows] = _row_dot(g, saved[per_expert * i + 1]).to(grad_weight_N.dtype)
                g_scaled = g * s
                torch.mm(a.t(), g_scaled, out=grad_w2[j])
                if grad_b2 is not None:
                    grad_b2[j] = g_scaled.sum(0)
                grad_a = g_scaled @ w2_eFD[j].t()
            else:  # out = (s * a) @ W2 + s * b2
                grad_a_unscaled = g @ w2_eFD[j].t()
                dot = _row_dot(grad_a_unscaled, a)
                if b2_eD is not None:
                    dot = dot + g.float() @ b2_eD[j].float()
                    grad_b2[j] = (g * s).sum(0)
                grad_weight_N[rows] = dot.to(grad_weight_N.dtype)
                torch.mm((a * s).t(), g, out=grad_w2[j])
                grad_a = grad_a_unscaled.mul_(s)
            grad_h = _activate_backward(grad_a, h, activation)
            torch.mm(x_TD.index_select(0, idx).t(), grad_h, out=grad_w1[j])
            if grad_b1 is not None:
                grad_b1[j] = grad_h.sum(0)
            grad_x_TD.index_add_(0, idx, grad_h @ w1_eDH[j].t())
        return grad_x_TD, grad_weight_N, None, grad_w1, grad_w2, grad_b1, grad_b2, None, None


class GroupedExperts(nn.Module):
    """The ``num_local_experts`` experts held by this rank, weights stacked as ``[e, D, F]``.

    ``first_expert_id`` is the global id of local expert 0; each expert's initialisation is seeded by
    its global id, so the same model results from any expert-parallel layout.
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
    ) -> None:
        super().__init__()
        self.num_local_experts = num_local_experts
        self.activation = activation
        self.first_expert_id = first_expert_id
        self.init_std = init_std
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
            for param in (self.w1, self.w2):
                param[j].copy_(torch.empty(param.shape[1:]).normal_(0.0, self.init_std, generator=gen))
            for param in (self.b1, self.b2):
                if param is not None:
                    param[j].zero_()

    def forward(self, x_ND: Tensor, tokens_per_expert: list[int], weight_N: Tensor | None = None) -> Tensor:
        """Run each local expert on its slice of ``x_ND``; scale row i of the output by ``weight_N[i]``."""
        if sum(tokens_per_expert) != x_ND.shape[0] or len(tokens_per_expert) != self.num_local_experts:
            raise ValueError(
                f"tokens_per_expert={tokens_per_expert} must have {self.num_local_experts} entries "
                f"summing to the {x_ND.shape[0]} rows of x_ND"
            )
        # Under autocast or mixed dtypes, compute in the activations' dtype; grads flow back through the cast.
        params = [None if p is None else p.to(x_ND.dtype) for p in (self.w1, self.w2, self.b1, self.b2)]
        return _GroupedMLP.apply(x_ND, weight_N, *params, tokens_per_expert, self.activation)

    def forward_routed(
        self, x_TD: Tensor, token_idx_N: Tensor, tokens_per_expert: list[int], weight_N: Tensor
    ) -> Tensor:
        """All experts local: ``y_TD = sum_i weight_N[i] * expert(x_TD[token_idx_N[i]])``.

        ``token_idx_N`` lists the kept assignments sorted by expert, ``tokens_per_expert[j]`` rows
        each (a :class:`~moe_parallel.capacity.DispatchPlan`). Same result as gathering the rows,
        :meth:`forward` and scatter-adding, without the ``[N, D]`` buffers in between.
        """
        if sum(tokens_per_expert) != token_idx_N.shape[0] or len(tokens_per_expert) != self.num_local_experts:
            raise ValueError(
                f"tokens_per_expert={tokens_per_expert} must have {self.num_local_experts} entries "
                f"summing to the {token_idx_N.shape[0]} routed rows"
            )
        params = [None if p is None else p.to(x_TD.dtype) for p in (self.w1, self.w2, self.b1, self.b2)]
        return _RoutedGroupedMLP.apply(
            x_TD.contiguous(), weight_N, token_idx_N, *params, tokens_per_expert, self.activation
        )

    def extra_repr(self) -> str:
        e, d, h = self.w1.shape
        return f"experts={e} (first global id {self.first_expert_id}), hidden={d}, up={h}, act={self.activation}"
