"""Which execution path runs the local experts: a deterministic function of the shape and the machine.

On a CUDA GPU where torch's grouped GEMM runs (bf16, compute capability >= 8.0), ``"grouped"``.
On a CPU, one of two paths that compute the same MLP on grouped rows:

- ``loop`` (``loop.py``): per expert, two GEMMs on its rows. GEMM work on the ``N`` rows only, but
  ~20 operator calls per active expert, and each expert's GEMMs are small, multi-threaded products:
  an expert costs as if it had ``expert_rows`` rows more than it has;
- ``padded`` (``padded.py``): runs of consecutive experts padded to their largest row count and
  computed as batched products (``bmm``): a handful of calls per run, but GEMM work on all ``S``
  padded slots, and every row copied into and out of the padded layout.

Estimated step time of each path, forward+backward::

    loop   = 12 (N + active * expert_rows) D F / gemm_flops + active * expert_call_s + 5 N D b / move
    padded = 12 S D F / gemm_flops + runs * padded_call_s + (3 S + 4 N) D b / move

(``b`` bytes per element, ``move`` = ``move_bytes_per_s``). The padding pays where experts are many
and small, the loop where each expert has many rows.

A padded run computes every expert at its busiest expert's rows, so ``S`` grows with the routing's
imbalance while the loop's cost does not. The choice is made before any routing is seen, from a
balanced step, so it prices the padded path at an assumed imbalance (``imbalance``: the busiest
expert of a run holds that many times the balanced rows; 1.3-2.1x in the tiny random Mixtral and
Qwen3-MoE of ``benchmarks/bench_models.py``) rather than at the balanced best case.

The choice never depends on a timing: a layer resolves its path once, at its first forward, from
its expert shape and the rows a balanced step gives each expert, with the constants of
:data:`DEFAULT_COST_MODEL` or of a calibration file named by ``MOE_PARALLEL_EXPERT_COST``
(:func:`calibrate` measures them: ``python -m moe_parallel.experts.choice calibrate cost.json``).
Two runs of one config, and a run and its resume, compute with the same kernels.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .activations import up_width
from .padded import padded_runs


@dataclass(frozen=True)
class ExpertCostModel:
    # Defaults: what calibrate() measures on a 2-core x86 CPU with 2 threads (medians of 7 runs each);
    # `python -m moe_parallel.experts.choice calibrate cost.json` measures them on another machine.
    gemm_flops: float = 1.12e11  # sustained fp32 GEMM rate of a large product, FLOP/s
    expert_call_s: float = 2.86e-4  # operator calls of one active expert in the loop, fwd+bwd
    expert_rows: float = 76.0  # the loop's small per-expert GEMMs, as rows of large-GEMM work
    padded_call_s: float = 1.63e-3  # operator calls of one run of experts in the padded path, fwd+bwd
    move_bytes_per_s: float = 2.04e9  # gather + scatter of activation rows larger than the caches
    imbalance: float = 2.0  # busiest expert's rows / balanced rows, assumed when pricing the padding

    def loop_s(self, counts: list[int], hidden: int, ffn: int, elem_bytes: int) -> float:
        rows = sum(counts)
        active = sum(1 for n in counts if n)
        return (
            12.0 * (rows + active * self.expert_rows) * hidden * ffn / self.gemm_flops
            + active * self.expert_call_s
            + 5.0 * rows * hidden * elem_bytes / self.move_bytes_per_s
        )

    def padded_s(self, counts: list[int], hidden: int, ffn: int, elem_bytes: int, imbalance: float = 1.0) -> float:
        """The padded path on ``counts``; with ``imbalance`` > 1, on counts whose busiest expert per
        run holds that many times its rows (at most the run's rows: a lone expert never pads)."""
        runs = padded_runs(counts, max(hidden, ffn), elem_bytes)
        rows = sum(counts)
        slots = 0.0
        for run in runs:
            run_counts = counts[run.start : run.stop]
            slots += len(run) * min(imbalance * max(run_counts), sum(run_counts))
        return (
            12.0 * slots * hidden * ffn / self.gemm_flops
            + len(runs) * self.padded_call_s
            + (3.0 * slots + 4.0 * rows) * hidden * elem_bytes / self.move_bytes_per_s
        )

    def choose(self, counts: list[int], hidden: int, ffn: int, elem_bytes: int = 4) -> str:
        """``"padded"`` or ``"loop"``, whichever the model expects to be faster (ties: the loop), the
        padding priced at the model's ``imbalance``."""
        if sum(counts) == 0:
            return "loop"
        padded = self.padded_s(counts, hidden, ffn, elem_bytes, self.imbalance)
        return "padded" if padded < self.loop_s(counts, hidden, ffn, elem_bytes) else "loop"


DEFAULT_COST_MODEL = ExpertCostModel()

COST_FILE_ENV = "MOE_PARALLEL_EXPERT_COST"


def cost_model() -> ExpertCostModel:
    """The constants in force: the calibration file named by ``MOE_PARALLEL_EXPERT_COST``, else the defaults."""
    path = os.environ.get(COST_FILE_ENV)
    if not path:
        return DEFAULT_COST_MODEL
    try:
        values = json.loads(Path(path).read_text())
        # Every measured constant is required; the routing assumption may be left at its default.
        optional = {"imbalance": DEFAULT_COST_MODEL.imbalance}
        return ExpertCostModel(
            **{f.name: float(values[f.name] if f.name in values else optional[f.name]) for f in fields(ExpertCostModel)}
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{COST_FILE_ENV}={path} is not a readable calibration file ({exc}); write one with "
            "`python -m moe_parallel.experts.choice calibrate PATH` or unset the variable"
        ) from None


def choose_expert_path(
    counts: list[int], hidden: int, ffn: int, activation: str = "gelu", dtype: torch.dtype = torch.float32
) -> str:
    """``"padded"`` or ``"loop"`` for a CPU step with ``counts[j]`` rows for local expert j.

    The padded path where the cost model expects it to be faster and one expert's weights are at
    most ``MAX_PADDED_EXPERT_BYTES`` (larger products stream the weights, the same in both paths,
    and dwarf the calls that padding saves); else the loop.
    """
    model = cost_model()  # read first: a broken calibration file fails at every shape
    up = up_width(activation, ffn)
    if hidden * (up + ffn) * dtype.itemsize > MAX_PADDED_EXPERT_BYTES:
        return "loop"
    return model.choose(counts, hidden, ffn, dtype.itemsize)


MAX_PADDED_EXPERT_BYTES = 64 << 20


def _median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _expert_step_s(path: str, counts: list[int], hidden: int, ffn: int, reps: int, gen: torch.Generator) -> float:
    """Seconds of one forward+backward of ``path``, ``counts[j]`` rows for expert j."""
    from .stacked import GroupedExperts  # stacked imports this module

    layer = GroupedExperts(len(counts), hidden, ffn, expert_gemm=path)
    x = torch.randn(sum(counts), hidden, generator=gen).requires_grad_()

    def run() -> None:
        layer(x, counts).sum().backward()

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


def main(argv: list[str] | None = None) -> int:
    """``calibrate PATH``: measure the constants on this machine and write them as JSON to PATH."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "calibrate":
        print("usage: python -m moe_parallel.experts.choice calibrate PATH", file=sys.stderr)
        return 2
    model = calibrate()
    Path(args[1]).write_text(json.dumps(asdict(model), indent=2) + "\n")
    print(f"wrote {args[1]}; pin it with {COST_FILE_ENV}={Path(args[1]).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
