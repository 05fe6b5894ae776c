"""Expert capacity and the keep/drop decision per (token, choice).

The result is a *plan*: the kept assignments sorted by expert, which is all the dispatcher needs.
No ``[T, E, C]`` masks are built: one stable sort over the T*k assignments does the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from .config import DropPolicy


def expert_capacity(
    num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None, min_capacity: int
) -> int | None:
    """``max(min_capacity, ceil(num_tokens * top_k / num_experts * capacity_factor))``; None = dropless.

    Exact rational arithmetic, so that e.g. ``4096 * 2 / 8 * 1.25`` is 1280 and not 1281 after rounding.
    """
    return capacity_from_ratio(num_tokens, top_k, num_experts, capacity_ratio(capacity_factor), min_capacity)


def capacity_ratio(capacity_factor: float | None) -> tuple[int, int] | None:
    """``capacity_factor`` as an exact ratio ``(p, q)`` (None stays None: dropless)."""
    if capacity_factor is None:
        return None
    factor = Fraction(capacity_factor).limit_denominator(1_000_000)
    return factor.numerator, factor.denominator


def capacity_from_ratio(
    num_tokens: int, top_k: int, num_experts: int, ratio: tuple[int, int] | None, min_capacity: int
) -> int | None:
    """:func:`expert_capacity` with the factor given as :func:`capacity_ratio`: integer arithmetic
    only, which ``torch.compile`` traces (also for a symbolic token count)."""
    if ratio is None:
        return None
    p, q = ratio
    return max(min_capacity, -(-num_tokens * top_k * p // (num_experts * q)))


@dataclass
class DispatchPlan:
    """Every (token, choice) assignment of this rank's tokens in dispatch order: the kept ones first,
    sorted by (global) expert id, then the dropped ones. Shapes are static (``A = T * top_k`` rows),
    so planning needs no host sync; how many rows are kept is a device value.
    """

    token_idx_A: Tensor  # int64 source token of each assignment, in dispatch order
    weight_A: Tensor  # float32 combine weight of each assignment (differentiable), same order
    tokens_per_expert_E: Tensor  # int64 kept assignments per expert: the first sum() rows are kept
    routed_per_expert_E: Tensor  # int64 assignments per expert before dropping
    num_dropped: Tensor  # int64 scalar
    may_drop: bool = False  # a capacity applies: rows past the kept ones may exist

    @property
    def num_kept(self) -> Tensor:
        """Kept assignments (int64 scalar on the device): rows ``[0, num_kept)`` are dispatched."""
        return self.tokens_per_expert_E.sum()


def order_by_expert(expert_A: Tensor, priority_A: Tensor | None = None, num_experts: int | None = None) -> Tensor:
    """Assignment indices grouped by expert, in assignment order; with ``priority_A``, highest
    priority first inside each expert (ties in assignment order). ``num_experts``: a bound on the
    ids (all in ``[0, num_experts)``) that lets the sort use narrower keys.

    One stable sort: a float32 priority (or narrower) becomes the low 32 bits of an int64 key, through
    the order-preserving map of IEEE bit patterns, behind the expert id. Two stable sorts (priority,
    then expert) give the same order at 2.5-4x the time; float64 priorities still take them.
    """
    if priority_A is None:
        return torch.argsort(_narrowest_ids(expert_A, num_experts), stable=True)
    priority_A = priority_A.detach()
    if priority_A.dtype == torch.float64:
        by_priority_A = torch.argsort(priority_A, descending=True, stable=True)
        return by_priority_A[torch.argsort(expert_A[by_priority_A], stable=True)]
    bits_A = (priority_A.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 ties with 0.0
    ascending_A = torch.where(bits_A >= 0, bits_A + 2**31, -1 - bits_A)  # in [0, 2^32), monotone in the value
    return torch.argsort(expert_A.to(torch.int64) * 2**32 + (2**32 - 1 - ascending_A), stable=True)


def _narrowest_ids(ids_A: Tensor, num_ids: int | None) -> Tensor:
    """``ids_A``, all in ``[0, num_ids)``, in the narrowest integer type that holds them: a stable
    sort of uint8 or int16 keys takes a quarter to a half of an int64 sort's time (fewer radix
    passes). Unknown ``num_ids``: as they are."""
    if num_ids is None:
        return ids_A
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if num_ids - 1 <= torch.iinfo(dtype).max:
            return ids_A.to(dtype)
    return ids_A


def plan_dispatch(
    expert_TK: Tensor,
    weight_TK: Tensor,
    tokens_per_expert_E: Tensor,
    capacity: int | None,
    drop_policy: DropPolicy,
) -> DispatchPlan:
    """Decide which (token, choice) assignments each expert keeps, and sort the kept ones by expert.

    Priorities inside an expert's queue:
    - ``position``: all first choices (in token order) before all second choices, and so on (GShard);
    - ``probs``: highest combine weight first (ties: the ``position`` order).
    At most ``capacity`` assignments per expert are kept.
    """
    num_tokens, top_k = expert_TK.shape
    # Assignment a = k * T + t: choice-major, so a stable sort keeps the GShard priority.
    expert_A = expert_TK.t().reshape(-1)
    weight_A = weight_TK.t().reshape(-1)
    priority_A = weight_A if drop_policy == "probs" and capacity is not None else None
    order_A, kept_E = keep_within_capacity(expert_A, tokens_per_expert_E, capacity, priority_A)
    return DispatchPlan(
        token_idx_A=order_A % num_tokens if num_tokens > 0 else order_A,
        weight_A=weight_A[order_A],
        tokens_per_expert_E=kept_E,
        routed_per_expert_E=tokens_per_expert_E,
        num_dropped=tokens_per_expert_E.sum() - kept_E.sum(),
        may_drop=capacity is not None,
    )


def keep_within_capacity(
    expert_A: Tensor, tokens_per_expert_E: Tensor, capacity: int | None, priority_A: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Dispatch order of the assignments ``expert_A`` and the kept count per expert.

    The order lists each expert's first ``capacity`` assignments (by ``priority_A``, highest first,
    else in assignment order), grouped by expert, then every dropped assignment (assignments with an
    expert id of ``E`` or more, never counted in ``tokens_per_expert_E``, count as dropped). Static
    shapes throughout: the kept rows are found by arithmetic on the sorted order, not by a mask.
    """
    num_experts = tokens_per_expert_E.numel()
    order_A = order_by_expert(expert_A, priority_A, num_experts=num_experts + 1)
    if capacity is None:  # ids of E or more sort last: the sorted order is the dispatch order
        return order_A, tokens_per_expert_E
    starts_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    expert_sorted_A = expert_A[order_A]
    in_range_A = expert_sorted_A < num_experts
    expert_sorted_A = expert_sorted_A.clamp(max=num_experts - 1)
    rank_A = torch.arange(order_A.numel(), device=order_A.device) - starts_E[expert_sorted_A]
    kept_E = tokens_per_expert_E.clamp(max=capacity)
    keep_A = in_range_A & (rank_A < capacity)
    kept_starts_E = torch.cumsum(kept_E, 0) - kept_E
    drop_A = (~keep_A).to(torch.int64)
    dropped_before_A = torch.cumsum(drop_A, 0) - drop_A
    dest_A = torch.where(keep_A, kept_starts_E[expert_sorted_A] + rank_A, kept_E.sum() + dropped_before_A)
    return torch.empty_like(order_A).scatter_(0, dest_A, order_A), kept_E
