"""Did our layer get slower or faster between two shape sweeps? DeepSpeed / ours, point by point.

Each sweep (``benchmarks/bench_moe.py --sweep --json FILE``) reads DeepSpeed / ours at every point
from rounds in which both ran in one process. DeepSpeed's layer is the same code in both sweeps, so
the change of that ratio at a point, ``(DS / ours)_after / (DS / ours)_before``, is our layer's
speed-up there, with the machine's drift between the two runs divided out. The report gives it per
point, and its median over the points shared by both sweeps with an order-statistic confidence
interval (distribution-free; ``benchmarks/harness/rounds.py``'s ``median_ci``, as ``bench_models.py``).

    git worktree add ../before <commit>
    PYTHONPATH=../before .venv/bin/python ../before/benchmarks/bench_moe.py --sweep --reps 8 --warmup 1 \\
        --no-memory --no-write --json runs/sweep-before.json
    .venv/bin/python benchmarks/bench_moe.py --sweep --reps 8 --warmup 1 --no-memory --no-write \\
        --json runs/sweep-after.json
    .venv/bin/python benchmarks/compare_sweeps.py runs/sweep-before.json runs/sweep-after.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.rounds import median_ci  # noqa: E402

RATIO = "deepspeed/ours"


def ratios(path: Path) -> dict[str, float]:
    """DeepSpeed / ours per point name (points that failed left out)."""
    points = json.loads(path.read_text())["points"]
    return {
        point["config"]["name"]: point["ratios"][RATIO]
        for point in points
        if not point.get("failed") and point["ratios"][RATIO]
    }


def report(before: dict[str, float], after: dict[str, float]) -> tuple[str, float, float]:
    """The markdown table and the median change with its lower confidence bound."""
    shared = [label for label in before if label in after]
    if not shared:
        raise SystemExit("compare_sweeps: the two sweeps share no point")
    change = {label: after[label] / before[label] for label in shared}
    low, high, coverage = median_ci(list(change.values()))
    median = statistics.median(change.values())
    lines = ["| point | DS / ours before | DS / ours after | after / before |", "|---|---|---|---|"]
    for label in shared:
        lines.append(f"| {label} | {before[label]:.2f} | {after[label]:.2f} | {change[label]:.2f} |")
    lines += [
        "",
        f"Our layer's speed-up, median over {len(shared)} points: {median:.3f} "
        f"(CI {low:.3f}-{high:.3f}, coverage {100 * coverage:.0f}%); "
        f"{sum(c >= 1.0 for c in change.values())} of {len(shared)} points at or above 1.0.",
    ]
    return "\n".join(lines), median, low


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="sweep JSON of the earlier code")
    parser.add_argument("after", type=Path, help="sweep JSON of the later code")
    parser.add_argument("--min-low", type=float, default=None, help="exit 1 if the lower bound is below this")
    args = parser.parse_args(argv)
    table, _, low = report(ratios(args.before), ratios(args.after))
    print(table)
    if args.min_low is not None and low < args.min_low:
        print(f"regression: the lower bound {low:.3f} is below {args.min_low}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
