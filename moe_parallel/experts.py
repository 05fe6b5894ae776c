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


def _expert_rows(x: Tensor, token_idx_N: Tensor | None, rows: slice) -> Tensor:
    """An expert's input rows: a slice of ``x`` when its rows are contiguous, else a gather."""
    return x[rows] if token_idx_N is None else x.index_select(0, token_idx_N[rows])


def _put_rows(y: Tensor, token_idx_N: Tensor | None, rows: slice, value: Tensor) -> None:
    """Write an expert's output rows: a copy into its slice, or a scatter-add onto its tokens."""
    if token_idx_N is None:
        y[rows].copy_(value)
    else:
        y.index_add_(0, token_idx_N[rows], value)


class _ExpertMLP(torch.autograd.Function):
    """y[t(i)] += w_i * (act(x[t(i)] @ W1[j] + b1[j]) @ W2[j] + b2[j]) for every row i of expert j.

    Rows are grouped by expert, ``counts[j]`` each. With ``token_idx_N`` row i reads and adds to
    token ``token_idx_N[i]`` of ``x``/``y`` (the single-rank path: each expert gathers its own rows
    and scatter-adds its output, so no ``[N, D]`` routed buffer exists and each expert's rows stay in
    cache); without it row i is row i (rows that an all-to-all delivered already grouped).

    The row scale ``w`` goes on the narrower side of the second product. When D <= F it scales the
    ``[n, D]`` output and the unscaled output ``o`` is kept: ``dL/dw = <g, o>`` is a dot over D and
    ``w * g`` feeds both weight gradients, so no ``[n, F]`` pass is spent on the scale. When D > F it
    scales the ``[n, F]`` activation in place. The activation is recomputed in backward from the
    saved pre-activation. Tensors are saved per expert: the allocator then reuses warm memory from
    step to step instead of mapping (and page-faulting) one fresh buffer of hundreds of MiB.
    """

    @staticmethod
    def forward(ctx, x, weight_N, token_idx_N, w1_eDH, w2_eFD, b1_eH, b2_eD, counts, activation):  # type: ignore[override]
        # The caller cast everything to the activations' dtype; autocast must not recast the products.
        with torch.autocast(x.device.type, enabled=False):
            scaled = weight_N is not None
            keep_output = scaled and w2_eFD.shape[-1] <= w2_eFD.shape[-2]  # D <= F: scale [n, D]
            slices = _expert_slices(counts)
            y = torch.empty_like(x) if token_idx_N is None else torch.zeros_like(x)
            scale_N1 = weight_N.to(x.dtype).unsqueeze(-1) if scaled else None
            saved: list[Tensor] = []
            for j, rows in slices:
                h = _linear(_expert_rows(x, token_idx_N, rows), w1_eDH[j], None if b1_eH is None else b1_eH[j])
                saved.append(h)
                a = activate(h, activation)  # a fresh tensor: scaling it in place keeps h intact
                b2 = None if b2_eD is None else b2_eD[j]
                if not scaled:
                    out = _linear(a, w2_eFD[j], b2)
                elif keep_output:
                    o = _linear(a, w2_eFD[j], b2)
                    saved.append(o)
                    out = o * scale_N1[rows]
                else:
                    s = scale_N1[rows]
                    out = _linear(a.mul_(s), w2_eFD[j], None if b2 is None else s * b2)
                _put_rows(y, token_idx_N, rows, out)
        ctx.save_for_backward(x, weight_N, token_idx_N, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved)
        ctx.slices, ctx.activation, ctx.keep_output = slices, activation, keep_output
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        with torch.autocast(grad_y.device.type, enabled=False):
            return _ExpertMLP._backward(ctx, grad_y.contiguous())

    @staticmethod
    def _backward(ctx, grad_y):
        x, weight_N, token_idx_N, w1_eDH, w2_eFD, b1_eH, b2_eD, *saved = ctx.saved_tensors
        slices, activation, keep_output = ctx.slices, ctx.activation, ctx.keep_output
        per_expert = 2 if keep_output else 1
        grad_x = torch.empty_like(x) if token_idx_N is None else torch.zeros_like(x)
        grad_w1, grad_w2 = _empty_grad(w1_eDH, slices), _empty_grad(w2_eFD, slices)
        grad_b1, grad_b2 = _empty_grad(b1_eH, slices), _empty_grad(b2_eD, slices)
        scaled = weight_N is not None
        grad_weight_N = torch.empty_like(weight_N) if scaled else None
        scale_N1 = weight_N.to(x.dtype).unsqueeze(-1) if scaled else None
        for i, (j, rows) in enumerate(slices):
            h = saved[per_expert * i]
            g = _expert_rows(grad_y, token_idx_N, rows)
            a = activate(h, activation)
            if not scaled:
                torch.mm(a.t(), g, out=grad_w2[j])
                if grad_b2 is not None:
                    grad_b2[j] = g.sum(0)
                grad_a = g @ w2_eFD[j].t()
            elif keep_output:  # out = s * o
                s = scale_N1[rows]
                grad_weight_N[rows] = _row_dot(g, saved[per_expert * i + 1]).to(grad_weight_N.dtype)
                g_scaled = g * s
                torch.mm(a.t(), g_scaled, out=grad_w2[j])
                if grad_b2 is not None:
                    grad_b2[j] = g_scaled.sum(0)
                grad_a = g_scaled @ w2_eFD[j].t()
            else:  # out = (s * a) @ W2 + s * b2
                s = scale_N1[rows]
                grad_a = g @ w2_eFD[j].t()
                dot = _row_dot(grad_a, a)
                if b2_eD is not None:
                    dot = dot + g.float() @ b2_eD[j].float()
                    grad_b2[j] = (g * s).sum(0)
                grad_weight_N[rows] = dot.to(grad_weight_N.dtype)
                torch.mm((a * s).t(), g, out=grad_w2[j])
                grad_a.mul_(s)
            grad_h = _activate_backward(grad_a, h, activation)
            torch.mm(_expert_rows(x, token_idx_N, rows).t(), grad_h, out=grad_w1[j])
            if grad_b1 is not None:
                grad_b1[j] = grad_h.sum(0)
            _put_rows(grad_x, token_idx_N, rows, grad_h @ w1_eDH[j].t())
        return grad_x, grad_weight_N, None, grad_w1, grad_w2, grad_b1, grad_b2, None, None


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

    def forward(
        self,
        x: Tensor,
        tokens_per_expert: list[int],
        weight_N: Tensor | None = None,
        token_idx_N: Tensor | None = None,
    ) -> Tensor:
        """Run each local expert on its rows and return ``y`` (same shape as ``x``).

        Rows are grouped by expert, ``tokens_per_expert[j]`` each, and row i is scaled by
        ``weight_N[i]``. Without ``token_idx_N`` row i is ``x[i]`` and its output ``y[i]`` (rows
        delivered already grouped); with it, row i reads ``x[token_idx_N[i]]`` and adds into
        ``y[token_idx_N[i]]``, so ``y`` sums each token's weighted expert outputs.
        """
        num_rows = x.shape[0] if token_idx_N is None else token_idx_N.shape[0]
        if sum(tokens_per_expert) != num_rows or len(tokens_per_expert) != self.num_local_experts:
            raise ValueError(
                f"tokens_per_expert={tokens_per_expert} must have {self.num_local_experts} entries "
                f"summing to the {num_rows} routed rows"
            )
        # Under autocast or mixed dtypes, compute in the activations' dtype; grads flow back through the cast.
        params = [None if p is None else p.to(x.dtype) for p in (self.w1, self.w2, self.b1, self.b2)]
        return _ExpertMLP.apply(x.contiguous(), weight_N, token_idx_N, *params, tokens_per_expert, self.activation)

    def extra_repr(self) -> str:
        e, d, h = self.w1.shape
        return f"experts={e} (first global id {self.first_expert_id}), hidden={d}, up={h}, act={self.activation}"
