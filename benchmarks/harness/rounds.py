"""Interleaved timing rounds: the order implementations run in, their seconds per round, medians,
per-round ratios, and an order-statistic interval for a median. Standard library only."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Timing:
    """Seconds per step of each implementation, one entry per round (rounds are aligned).

    An implementation that failed (its worker died: out of memory, an exception) has no rounds; its
    reason is in ``failed`` and its cells stay empty.
    """

    rounds: dict[str, list[float]]
    kept_rows: int
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    deepspeed_rows: int = 0  # the rows DeepSpeed's experts compute on, padding included (ds_buffer_rows)
    expert_paths: list[str] | None = None  # the path ours' experts ran, per rank (None: ours did not run)

    def padding_ratio(self) -> float | None:
        """DeepSpeed's expert rows over ours: DS / ours if both ran nothing but their expert GEMMs."""
        return self.deepspeed_rows / self.kept_rows if self.kept_rows and self.deepspeed_rows else None

    def median_ms(self, name: str) -> float | None:
        return statistics.median(self.rounds[name]) * 1e3 if self.rounds.get(name) else None

    def ratio(self, num: str, den: str) -> float | None:
        """Median over rounds of the per-round ratio: load that drifts between rounds cancels out."""
        if not (self.rounds.get(num) and self.rounds.get(den)):
            return None
        return statistics.median(a / b for a, b in zip(self.rounds[num], self.rounds[den]))


def balanced_orders(n: int) -> list[list[int]]:
    """``n - 1`` round orders of ``n`` implementations (each order a permutation) such that, run one
    after another and over again, each implementation runs right after each other one exactly once
    per cycle, across the rounds' boundaries too.

    A plain rotation keeps every implementation behind the same predecessor in all but one round, and
    the predecessor matters: a step right after DeepSpeed's, whose buffers push the others' data out
    of the caches, runs slower than after a lighter one. Found by a depth-first search (instant up to
    a dozen implementations; a bench runs 4-5).
    """
    if n <= 2:
        return [list(range(n))] if n else []
    length = n * (n - 1)
    sequence, followed = [0], set()

    def extend() -> bool:
        if len(sequence) == length:  # closing the cycle must add the one pair not yet used
            return sequence[-1] != sequence[0] and (sequence[-1], sequence[0]) not in followed
        in_round = sequence[len(sequence) - len(sequence) % n :]
        for nxt in range(n):
            pair = (sequence[-1], nxt)
            if nxt in in_round or nxt == sequence[-1] or pair in followed:
                continue
            followed.add(pair)
            sequence.append(nxt)
            if extend():
                return True
            sequence.pop()
            followed.discard(pair)
        return False

    if not extend():
        raise RuntimeError(f"no balanced round orders for {n} implementations")
    return [sequence[i : i + n] for i in range(0, length, n)]


def time_interleaved(
    steps: dict[str, Callable[[], float]], warmup: int, reps: int, failed: dict[str, str] | None = None
) -> dict[str, list[float]]:
    """Seconds per step of each implementation, in rounds whose orders balance which implementation
    runs right before which (``balanced_orders``).

    With ``failed`` given, an implementation whose step raises RuntimeError is dropped (the reason goes
    into ``failed``) and the others go on.
    """
    names = list(steps)
    rounds: dict[str, list[float]] = {name: [] for name in names}

    def one(name: str, record: bool) -> None:
        if name not in rounds:
            return
        try:
            seconds = steps[name]()
        except RuntimeError as err:
            if failed is None:
                raise
            failed[name] = str(err)
            del rounds[name]
            return
        if record:
            rounds[name].append(seconds)

    orders = balanced_orders(len(names))
    for rnd in range(-warmup, reps):  # warm-up rounds end with the order the first timed one follows in a cycle
        for i in orders[rnd % len(orders)]:
            one(names[i], record=rnd >= 0)
    return rounds


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Order-statistic interval ``[x(j), x(n+1-j)]`` for the median: the narrowest whose coverage
    ``1 - 2 P(Binomial(n, 1/2) < j)`` is at least ``level`` (or [min, max] if none is); returns
    (low, high, coverage). Distribution-free: it assumes only independent rounds."""
    xs, n = sorted(values), len(values)

    def coverage(j: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) / 2**n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= level:
        j += 1
    return xs[j - 1], xs[n - j], coverage(j)
