"""A naive per-token MoE, written for clarity only: the oracle for the fast layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_parallel import GroupedExperts, MoEConfig, MoELayer
from moe_parallel.core.capacity import expert_capacity


def naive_keep(expert_TK: Tensor, weight_TK: Tensor, num_experts: int, capacity: int | None, policy: str) -> Tensor:
    """Boolean [T, K]: which (token, choice) assignments an expert keeps, decided one by one."""
    T, K = expert_TK.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for e in range(num_experts):
        queue = [(k, t) for k in range(K) for t in range(T) if expert_TK[t, k] == e]  # GShard order
        if policy == "probs" and capacity is not None:
            queue.sort(key=lambda kt: -float(weight_TK[kt[1], kt[0]]))  # stable: ties keep GShard order
        for k, t in queue if capacity is None else queue[:capacity]:
            keep[t, k] = True
    return keep


def activation(h: Tensor, name: str) -> Tensor:
    if name == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[name](h)


def naive_moe(layer: MoELayer, x: Tensor, capacity_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """Output and weighted aux loss of ``layer`` (EP=1) on ``x``, token by token.

    ``capacity_tokens`` overrides the token count that capacity is computed from (EP groups agree
    on the largest local count).
    """
    cfg = layer.config
    x_TD = x.reshape(-1, cfg.hidden_size)
    T = x_TD.shape[0]
    logits = x_TD.float() @ layer.router.weight.float().t()
    scores = torch.softmax(logits, -1) if cfg.score_func == "softmax" else torch.sigmoid(logits)
    selection = scores.detach()
    if layer.router.uses_expert_bias:
        selection = selection + layer.router.expert_bias
    expert_TK = torch.topk(selection, cfg.top_k, dim=-1).indices
    weight_TK = scores.gather(1, expert_TK)
    if cfg.normalize_top_k and cfg.top_k > 1:
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
    factor = cfg.capacity_factor if layer.training else cfg.eval_capacity_factor
    capacity = expert_capacity(
        T if capacity_tokens is None else capacity_tokens, cfg.top_k, cfg.num_experts, factor, cfg.min_capacity
    )
    keep = naive_keep(expert_TK, weight_TK.detach(), cfg.num_experts, capacity, cfg.drop_policy)

    ex = layer.experts
    rows = []
    for t in range(T):
        y = torch.zeros_like(x_TD[t])
        for k in range(cfg.top_k):
            if not keep[t, k]:
                continue
            e = int(expert_TK[t, k])
            h = x_TD[t] @ ex.w1[e] + (0 if ex.b1 is None else ex.b1[e])
            out = activation(h, cfg.activation) @ ex.w2[e] + (0 if ex.b2 is None else ex.b2[e])
            y = y + weight_TK[t, k].to(x.dtype) * out
        if layer.shared_expert is not None:
            sh = layer.shared_expert
            y = y + activation(x_TD[t] @ sh.w1[0], cfg.activation) @ sh.w2[0]
        rows.append(y)
    y_TD = torch.stack(rows) if rows else x_TD * 0

    probs = scores if cfg.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
    counts = torch.bincount(expert_TK.flatten(), minlength=cfg.num_experts).float()
    balance = cfg.num_experts * (counts / (T * cfg.top_k) * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    aux = cfg.aux_loss_coeff * balance + cfg.z_loss_coeff * z if T > 0 else logits.sum() * 0  # no tokens, no loss
    return y_TD.view(x.shape), aux


def expert_pair(
    num_experts: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", **kwargs: Any
) -> tuple[GroupedExperts, GroupedExperts]:
    """The per-expert loop and the grouped GEMM over the same weights (``kwargs``: GroupedExperts').

    Biases, when asked for, are drawn from N(0, 1) so that a path that drops them shows.
    """
    loop = GroupedExperts(num_experts, expert_gemm="loop", **kwargs).to(device, dtype)
    grouped = GroupedExperts(num_experts, expert_gemm="grouped", **kwargs).to(device, dtype)
    if kwargs.get("bias"):
        with torch.no_grad():
            for b in (loop.b1, loop.b2):
                b.normal_()
    grouped.load_state_dict(loop.state_dict())
    return loop, grouped


def run_experts(experts: GroupedExperts, x: Tensor, counts: Tensor | list[int], grad: Tensor) -> dict[str, Tensor]:
    """Forward and backward of ``experts`` on a copy of ``x`` (rows grouped by expert, ``counts`` each).

    Returns ``"y"``, ``"grad x"`` and ``"grad <parameter>"`` for every parameter.
    """
    x = x.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = experts(x, counts)
    y.backward(grad)
    return {"y": y, "grad x": x.grad} | {f"grad {name}": p.grad for name, p in experts.named_parameters()}


def naive_top_k(cfg: MoEConfig, logits_E: Tensor, selection_bias: Tensor | None = None) -> tuple[list[int], Tensor]:
    """One token's routed experts (best first) and combine weights, decided as the config says.

    Experts are ranked by score plus ``selection_bias`` (group-limited: only the ``topk_groups`` groups
    whose best one or two experts score highest); the weights are differentiable through ``logits_E``.
    """
    scores = torch.softmax(logits_E, 0) if cfg.score_func == "softmax" else torch.sigmoid(logits_E)
    selection = (scores.detach() + (0.0 if selection_bias is None else selection_bias)).tolist()
    per_group = cfg.num_experts // cfg.num_groups
    allowed = list(range(cfg.num_experts))
    if cfg.num_groups > 1:
        best = 1 if cfg.group_score == "max" else 2
        group_scores = [
            sum(sorted(selection[g * per_group : (g + 1) * per_group])[-best:]) for g in range(cfg.num_groups)
        ]
        kept_groups = sorted(range(cfg.num_groups), key=lambda g: -group_scores[g])[: cfg.topk_groups]
        allowed = [e for e in allowed if e // per_group in kept_groups]
    chosen = sorted(allowed, key=lambda e: -selection[e])[: cfg.top_k]
    if cfg.score_after_topk:
        weights = torch.softmax(logits_E[chosen], 0)
    else:
        weights = scores[chosen]
        if cfg.normalize_top_k and cfg.top_k > 1:
            weights = weights / weights.sum()
    return chosen, weights * cfg.routed_scaling_factor
