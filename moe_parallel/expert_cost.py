"""Which execution path runs the local experts: a small cost model, calibrated by measurement.

Two CPU paths compute the same MLP (``experts.py``):

- ``loop``: per expert, gather its kept rows, two GEMMs, scatter-add the output. GEMM work on the
  ``N`` kept rows only, but ~20 operator calls per active expert, and each expert's GEMMs are small,
  multi-threaded products: an expert costs as if it had ``expert_rows`` rows more than it has;
- ``padded``: runs of consecutive experts (``padded_runs``), each padded to its largest row count
  and computed as batched products (``bmm``): a handful of calls per run, but GEMM work on all
  ``S`` padded slots, and every row copied into and out of the padded layout.

Estimated step time of each path, forward+backward::

    loop   = 12 (N + active * expert_rows) D F / gemm_flops + active * expert_call_s + 5 N D b / move
    padded = 12 S D F / gemm_flops + runs * padded_call_s + (3 S + 4 N) D b / move

(``b`` bytes per element, ``move`` = ``move_bytes_per_s``; the row passes count the gathers,
scatters and zero-fills of each path). The padding pays where experts are many and small, the loop
where each expert has many rows and narrow products, so that moving rows costs more than the calls
it saves. The constants are measured by :func:`calibrate` (``benchmarks/bench_moe.py --calibrate``);
the defaults are this project's 2-core CPU (BENCHMARKS.md, "Cost model").

What one expert's small products cost in each path depends on the CPU and its BLAS more than on
any constant: weight-bound shapes ran 4-14% faster padded on one 2-core VM and 5-21% slower on
another (BENCHMARKS.md, "A second CPU"). So :func:`choose_expert_path` lets the model above only rule the padded
path out (where moving rows into its layout costs more than the calls it saves); where it does
not, both paths are timed on this machine at the step's own shape, once per shape and process, and
the faster runs from then on. On CUDA the grouped GEMM is chosen before any of this is asked
(``GroupedExperts``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertCostModel:
    # Medians of seven calibrate() runs here on 2026-12-02 (2 threads, load 1.0-1.5): BENCHMARKS.md.
    gemm_flops: float = 1.12e11  # sustained fp32 GEMM rate of a large product, FLOP/s
    expert_call_s: float = 2.86e-4  # operator calls of one active expert in the loop, fwd+bwd
    expert_rows: float = 76.0  # the loop's small per-expert GEMMs, as rows of large-GEMM work
    padded_call_s: float = 1.63e-3  # operator calls of one run of experts in the padded path, fwd+bwd
    move_bytes_per_s: float = 2.04e9  # gather + scatter of activation rows larger than the caches

    def loop_s(self, counts: list[int], hidden: int, ffn: int, elem_bytes: int) -> float:
        rows = sum(counts)
        active = sum(1 for n in counts if n)
        return (
            12.0 * (rows + active * self.expert_rows) * hidden * ffn / self.gemm_flops
            + active * self.expert_call_s
            + 5.0 * rows * hidden * elem_bytes / self.move_bytes_per_s
        )

    def padded_s(self, counts: list[int], hidden: int, ffn: int, elem_bytes: int) -> float:
        from .experts import padded_runs  # experts imports this module

        runs = padded_runs(counts, max(hidden, ffn), elem_bytes)
        rows = sum(counts)
        slots = sum(len(run) * max(counts[run.start : run.stop]) for run in runs)
        return (
            12.0 * slots * hidden * ffn / self.gemm_flops
            + len(runs) * self.padded_call_s
            + (3.0 * slots + 4.0 * rows) * hidden * elem_bytes / self.move_bytes_per_s
        )

    def choose(self, counts: list[int], hidden: int, ffn: int, elem_bytes: int = 4) -> str:
        """``"padded"`` or ``"loop"``, whichever the model expects to be faster (ties: the loop)."""
        if sum(counts) == 0:
            return "loop"
        padded = self.padded_s(counts, hidden, ffn, elem_bytes)
        return "padded" if padded < self.loop_s(counts, hidden, ffn, elem_bytes) else "loop"


DEFAULT_COST_MODEL = ExpertCostModel()

# A measured padded step must be this much faster than the loop's to replace it: the paths are
# within a few percent of each other at many shapes, and then the loop (fewer live bytes) stays.
PADDED_MIN_GAIN = 0.03
# One expert's weights above this: the loop, unmeasured. Its products then stream the weights (the
# same in both paths) and dwarf the calls that padding saves.
MAX_MEASURED_EXPERT_BYTES = 64 << 20

_measured_paths: dict[tuple, str] = {}


def measurement_key(
    counts: list[int], hidden: int, ffn: int, activation: str, dtype: torch.dtype, backward: bool = True
) -> tuple:
    """Steps whose shapes share a key share one measurement: same expert shape, dtype, threads,
    forward + backward or forward only, number of local and active experts, and mean rows per
    active expert within a half-octave."""
    active = [n for n in counts if n]
    mean_rows = sum(active) / len(active)
    half_octave = round(2.0 * math.log2(mean_rows))
    threads = torch.get_num_threads()
    return hidden, ffn, activation, dtype, threads, backward, len(counts), len(active), half_octave


def choose_expert_path(
    counts: list[int],
    hidden: int,
    ffn: int,
    activation: str = "gelu",
    dtype: torch.dtype = torch.float32,
    step_s: Callable[[str], float] | None = None,
    backward: bool = True,
) -> str:
    """``"padded"`` or ``"loop"`` for one CPU step with ``counts[j]`` rows for local expert j.

    The loop where :data:`DEFAULT_COST_MODEL` expects it to be faster, or where one expert's weights
    exceed ``MAX_MEASURED_EXPERT_BYTES``. Elsewhere ``step_s(path)`` (the seconds of one forward,
    plus backward if ``backward``, of ``path`` at these counts) decides, measured once per
    :func:`measurement_key` in a process: the padded path if it is ``PADDED_MIN_GAIN`` faster.
    Without ``step_s``, the model's choice.
    """
    if sum(counts) == 0 or DEFAULT_COST_MODEL.choose(counts, hidden, ffn, dtype.itemsize) == "loop":
        return "loop"
    up = 2 * ffn if activation == "swiglu" else ffn
    if hidden * (up + ffn) * dtype.itemsize > MAX_MEASURED_EXPERT_BYTES:
        return "loop"
    if step_s is None:
        return "padded"
    key = measurement_key(counts, hidden, ffn, activation, dtype, backward)
    if key not in _measured_paths:
        _measured_paths[key] = _faster_path(step_s)
        log.info("expert path at %s: %s", key, _measured_paths[key])
    return _measured_paths[key]


def _faster_path(step_s: Callable[[str], float], rounds: int = 3) -> str:
    """Each path once to warm it up, then ``rounds`` rounds of both in alternating order; the padded
    path if the median of its per-round time ratios to the loop is within the required gain."""
    for path in ("loop", "padded"):
        step_s(path)
    ratios = []
    for r in range(rounds):
        times = {path: step_s(path) for path in (("loop", "padded") if r % 2 == 0 else ("padded", "loop"))}
        ratios.append(times["padded"] / times["loop"])
    return "padded" if sorted(ratios)[len(ratios) // 2] <= 1.0 - PADDED_MIN_GAIN else "loop"


def _median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _expert_step_s(path: str, counts: list[int], hidden: int, ffn: int, reps: int, gen: torch.Generator) -> float:
    """Seconds of one forward+backward of ``path``, ``counts[j]`` rows for expert j, gathered by token index."""
    from .experts import GroupedExperts  # experts imports this module

    layer = GroupedExperts(len(counts), hidden, ffn, expert_gemm=path)
    rows = sum(counts)
    x = torch.randn(rows, hidden, generator=gen).requires_grad_()
    weight = torch.rand(rows, generator=gen).requires_grad_()
    token_idx = torch.randperm(rows, generator=gen)

    def run() -> None:
        layer(x, counts, weight, token_idx).sum().backward()

    return _median_s(run, reps)


def calibrate(reps: int = 7, hidden: int = 512, ffn: int = 1024) -> ExpertCostModel:
    """Measure the model's constants on this machine (CPU, float32, torch's current thread count).

    - ``gemm_flops``: one ``[4096, hidden] x [hidden, ffn]`` product;
    - ``move_bytes_per_s``: an ``index_select`` of 65536 random rows of 256 floats plus the
      ``index_add_`` back (64 MiB: larger than the caches, as a step's activations are);
    - ``expert_call_s``: the loop on 64 experts of 1 row each, per expert (calls, no GEMM work);
    - ``padded_call_s``: the padded path on the same input (one run of experts);
    - ``expert_rows``: the loop on 32 experts of 64 rows each, ``hidden x hidden``, less what the other
      terms account for, per expert, in rows of GEMM work.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4096, hidden, generator=gen)
    b = torch.randn(hidden, ffn, generator=gen)
    gemm_flops = 2.0 * 4096 * hidden * ffn / _median_s(lambda: torch.mm(a, b), reps)

    x = torch.randn(65536, 256, generator=gen)
    idx = torch.randperm(65536, generator=gen)
    move_bytes_per_s = 3.0 * x.numel() * 4 / _median_s(lambda: torch.zeros_like(x).index_add_(0, idx, x[idx]), reps)

    tiny = [1] * 64
    expert_call_s = _expert_step_s("loop", tiny, 64, 64, reps, gen) / len(tiny)
    padded_call_s = _expert_step_s("padded", tiny, 64, 64, reps, gen)

    small = [64] * 32
    model = ExpertCostModel(gemm_flops, expert_call_s, 0.0, padded_call_s, move_bytes_per_s)
    excess_s = _expert_step_s("loop", small, hidden, hidden, reps, gen) - model.loop_s(small, hidden, hidden, 4)
    expert_rows = max(0.0, excess_s * gemm_flops / (12.0 * hidden * hidden * len(small)))
    return ExpertCostModel(gemm_flops, expert_call_s, expert_rows, padded_call_s, move_bytes_per_s)
