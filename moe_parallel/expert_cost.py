"""Which execution path runs the local experts: a small cost model, calibrated by measurement.

Two CPU paths compute the same MLP (``experts.py``):

- ``loop``: per expert, gather its kept rows, two GEMMs, scatter-add the output. GEMM work on the
  ``N`` kept rows only, but about 30 operator calls per active expert per step (forward+backward);
- ``padded``: one gather into a ``[e, C, D]`` buffer (``C`` = the largest row count of any local
  expert), two batched products (``bmm``), one combine. A fixed handful of calls, but GEMM work and
  memory traffic on all ``e * C`` slots.

The padding pays when the calls it saves cost more than the extra rows: many small experts, or
tight, even routing (``e * C`` close to ``N``). Estimated step time of each path, forward+backward::

    loop   = 12 N D F / gemm_flops + active * expert_call_s + 5 N D b / move_bytes_per_s
    padded = 12 S D F / gemm_flops + padded_call_s          + (3 S + 4 N) D b / move_bytes_per_s

(``S = e * C`` slots, ``b`` bytes per element; the row passes count the gathers, scatters and
zero-fills each path makes). The constants are measured by :func:`calibrate` (``benchmarks/
bench_moe.py --calibrate``); the defaults below are this project's 2-core CPU (BENCHMARKS.md, "Cost
model"). On CUDA the grouped GEMM is chosen before this model is asked (``GroupedExperts``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertCostModel:
    # Medians of four calibrate() runs here on 2026-12-01 (2 threads, load < 1): BENCHMARKS.md.
    gemm_flops: float = 1.4e11  # sustained fp32 GEMM rate, FLOP/s
    expert_call_s: float = 1.45e-4  # operator calls of one active expert in the loop, fwd+bwd
    padded_call_s: float = 8.9e-4  # operator calls of the padded path, fwd+bwd, whatever e
    move_bytes_per_s: float = 1.0e10  # gather + scatter-add of activation rows

    def loop_s(self, counts: list[int], hidden: int, ffn: int, elem_bytes: int) -> float:
        rows = sum(counts)
        active = sum(1 for n in counts if n)
        return (
            12.0 * rows * hidden * ffn / self.gemm_flops
            + active * self.expert_call_s
            + 5.0 * rows * hidden * elem_bytes / self.move_bytes_per_s
        )

    def padded_s(self, counts: list[int], hidden: int, ffn: int, elem_bytes: int) -> float:
        rows, slots = sum(counts), len(counts) * max(counts, default=0)
        return (
            12.0 * slots * hidden * ffn / self.gemm_flops
            + self.padded_call_s
            + (3.0 * slots + 4.0 * rows) * hidden * elem_bytes / self.move_bytes_per_s
        )

    def choose(self, counts: list[int], hidden: int, ffn: int, elem_bytes: int = 4) -> str:
        """``"padded"`` or ``"loop"``, whichever the model expects to be faster (ties: the loop)."""
        if sum(counts) == 0:
            return "loop"
        padded = self.padded_s(counts, hidden, ffn, elem_bytes)
        return "padded" if padded < self.loop_s(counts, hidden, ffn, elem_bytes) else "loop"


DEFAULT_COST_MODEL = ExpertCostModel()


def _median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def calibrate(reps: int = 7, hidden: int = 512, ffn: int = 1024) -> ExpertCostModel:
    """Measure the model's constants on this machine (CPU, float32, torch's current thread count).

    - ``gemm_flops``: one ``[4096, hidden] x [hidden, ffn]`` product;
    - ``move_bytes_per_s``: an ``index_select`` of 8192 random rows plus the ``index_add_`` back;
    - ``expert_call_s``: the loop path on 64 experts of 1 row each, forward+backward, per expert;
    - ``padded_call_s``: the padded path on the same input (its fixed cost).
    """
    from .experts import GroupedExperts  # experts imports this module

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4096, hidden, generator=gen)
    b = torch.randn(hidden, ffn, generator=gen)
    gemm_flops = 2.0 * 4096 * hidden * ffn / _median_s(lambda: torch.mm(a, b), reps)

    x = torch.randn(8192, hidden, generator=gen)
    idx = torch.randperm(8192, generator=gen)
    move_bytes_per_s = 3.0 * x.numel() * 4 / _median_s(lambda: torch.zeros_like(x).index_add_(0, idx, x[idx]), reps)

    experts = 64
    tiny = torch.randn(experts, 64, generator=gen)
    counts = [1] * experts

    def step(path: str) -> float:
        layer = GroupedExperts(experts, 64, 64, expert_gemm=path)
        x_ = tiny.clone().requires_grad_()
        weight = torch.rand(experts, generator=gen).requires_grad_()

        def run() -> None:
            layer(x_, counts, weight, torch.arange(experts)).sum().backward()

        return _median_s(run, reps)

    return ExpertCostModel(
        gemm_flops=gemm_flops,
        expert_call_s=step("loop") / experts,
        padded_call_s=step("padded"),
        move_bytes_per_s=move_bytes_per_s,
    )
