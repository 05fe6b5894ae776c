"""The sampled shape sweep of ``make bench-sweep``: ours, the DeepSpeed drop-in and DeepSpeed at a
seeded sample of shapes, each point's implementations timed in one process; and the merge of
several sweep runs' JSON into one results block.

Every axis of the sample is balanced (each value appears equally often) and no pair of axes is tied
together; T is sized per point so that DeepSpeed's step takes about ``--sweep-target-s``. Another
``--sweep-seed`` draws a held-out sample of the same space into a block of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness.configs import BenchConfig, Target, ds_buffer_rows, runnable_on
from benchmarks.harness.report import cell, command_line, fmt_mib, machine_line, write_json, write_results
from benchmarks.harness.rounds import Timing, time_interleaved
from benchmarks.harness.workers import TUNED_MALLOC_ENV, Implementation
from benchmarks.moe_memory import run_memory

SWEEP_EXPERTS = (8, 16, 32, 64, 128)
SWEEP_TOP_K = (1, 2, 4, 6, 8)
SWEEP_HIDDEN = (256, 512, 1024)
SWEEP_FFN_RATIO = (0.5, 1, 2, 4)
SWEEP_CAPACITY = (1.0, 1.25, 2.0, None)  # None: dropless
SWEEP_POLICY = ("position", "probs")
# Every implementation of a sweep point runs in one process (one per EP rank), round by round: two
# processes running identical code differ (heap layout, page placement) by more than the gaps the
# sweep resolves. "ours_twin" is ours on a second copy of the layer: twin / ours is what the run
# resolves at that point.
SWEEP_PROCESS = ("ours", "deepspeed", "compat", "moved", "ours_twin")
# That process's glibc keeps what is freed (TUNED_MALLOC_ENV), so that no implementation page-faults
# memory in after warm-up, whatever ran before it. Under glibc's trimming, one implementation's frees
# decide whether the next one's buffers come back warm, which slows DeepSpeed's step (its GEMMs write
# freshly faulted gradients) depending on its neighbours rather than on its own work.
SWEEP_MALLOC_ENV = TUNED_MALLOC_ENV
SWEEP_MEMORY_IMPLS = ("ours", "deepspeed", "compat")
SWEEP_SEED = 12
SWEEP_TARGET_S = 0.4  # estimated DeepSpeed step (the slowest of the three), seconds
# What sizes T on a CPU: a small CPU's sustained fp32 GEMM rate and row-copy bandwidth. Fixed here,
# not read from the cost model, so that the sweep's shapes stay the same when the cost model is
# recalibrated.
SWEEP_GEMM_FLOPS, SWEEP_MOVE_BYTES_PER_S = 1.3e11, 4.0e9
# On a GPU (bf16): an H200's sustained grouped-GEMM rate and HBM copy bandwidth, roughly; T is
# clamped higher there, so that a step is not all launch latency.
SWEEP_GPU_GEMM_FLOPS, SWEEP_GPU_MOVE_BYTES_PER_S, SWEEP_GPU_MAX_TOKENS = 4.0e14, 2.0e12, 131072
# Rows moved per routed row and step, beyond the GEMMs (gathers, scatters, fills, activation passes),
# in units of D (and of F for the activation): a rough count for DeepSpeed's padded layer.
SWEEP_ROW_PASSES_D, SWEEP_ROW_PASSES_F = 12.0, 6.0
# Two named shapes, run at their own T: a Switch-style top-1 layer at cf=1.0, and many small experts.
SWEEP_NAMED = (
    BenchConfig("named-switch", 8192, 512, 1024, 16, 1, 1.0),
    BenchConfig("named-small-experts", 4096, 256, 1024, 64, 2, 1.25),
)


def sweep_tokens(
    hidden: int,
    ffn: int,
    top_k: int,
    capacity_factor: float | None,
    experts: int,
    target_s: float = SWEEP_TARGET_S,
    device: str = "cpu",
) -> int:
    """T such that DeepSpeed's step takes about ``target_s``, from a FLOP and traffic estimate.

    Per token DeepSpeed computes ``k * cf`` expert rows (dropless: about 1.3 for the imbalance of a
    fresh router): ``12 D F`` FLOPs each at the GEMM rate above, plus the row passes above at the
    copy bandwidth above. Rounded to a multiple of 64, within [256, 32768] (a GPU's maximum higher).
    """
    gpu = device == "cuda"
    flops = SWEEP_GPU_GEMM_FLOPS if gpu else SWEEP_GEMM_FLOPS
    bandwidth, elem_bytes = (SWEEP_GPU_MOVE_BYTES_PER_S, 2.0) if gpu else (SWEEP_MOVE_BYTES_PER_S, 4.0)
    rows = top_k * (1.3 if capacity_factor is None else capacity_factor)
    gemm_s = 12.0 * hidden * ffn / flops
    move_s = elem_bytes * (SWEEP_ROW_PASSES_D * hidden + SWEEP_ROW_PASSES_F * ffn) / bandwidth
    per_token_s = rows * (gemm_s + move_s) + 4.0 * 8 * experts / bandwidth  # + the router's [T, E]
    tokens = int(target_s / per_token_s) // 64 * 64
    return max(256, min(SWEEP_GPU_MAX_TOKENS if gpu else 32768, tokens))


def _balanced(values: tuple, count: int, rng: random.Random) -> list:
    """``count`` draws from ``values``, each value equally often (up to one), in a shuffled order."""
    out = [values[i % len(values)] for i in range(count)]
    rng.shuffle(out)
    return out


def sweep_points(
    count: int = 32,
    ep2: int = 3,
    quick: bool = False,
    target_s: float = SWEEP_TARGET_S,
    device: str = "cpu",
    seed: int = SWEEP_SEED,
) -> list[BenchConfig]:
    """The sampled sweep: ``count`` EP=1 points whose every axis is balanced (each value of each axis
    appears equally often), the named shapes, and ``ep2`` of the points again at EP=2.

    Deterministic for a ``seed``; another seed draws a held-out sample of the same space. ``quick``:
    the same machinery at tiny sizes, two points and one EP=2 point.
    """
    rng = random.Random(seed)
    if quick:
        points = [
            BenchConfig("q1", 256, 32, 64, 8, 1, 1.0),
            BenchConfig("q2", 256, 32, 16, 16, 6, None),
        ]
        return points + [dataclasses.replace(points[0], name="q1-ep2", ep_size=2, drop_policy="probs")]
    axes = [
        _balanced(SWEEP_EXPERTS, count, rng),
        _balanced(SWEEP_TOP_K, count, rng),
        _balanced(SWEEP_HIDDEN, count, rng),
        _balanced(SWEEP_FFN_RATIO, count, rng),
        _balanced(SWEEP_CAPACITY, count, rng),
        _balanced(SWEEP_POLICY, count, rng),
    ]
    points = []
    for i, (experts, k, hidden, ratio, cf, policy) in enumerate(zip(*axes)):
        ffn = int(hidden * ratio)
        tokens = sweep_tokens(hidden, ffn, k, cf, experts, target_s, device)
        points.append(BenchConfig(f"s{i + 1:02d}", tokens, hidden, ffn, experts, k, cf, drop_policy=policy))
    named = [dataclasses.replace(c) for c in SWEEP_NAMED]
    ep2_points = [
        dataclasses.replace(p, name=f"{p.name}-ep2", ep_size=2)
        for p in rng.sample([p for p in points if p.tokens >= 1024], ep2)
    ]
    return points + named + ep2_points


def sweep_block(device: str, dtype: str, seed: int = SWEEP_SEED) -> str:
    """The sweep's results block of BENCHMARKS.md: one per device and dtype, and one per held-out seed."""
    block = "sweep" if (device, dtype) == ("cpu", "float32") else f"sweep-{device}-{dtype}"
    return block if seed == SWEEP_SEED else f"{block}-seed{seed}"


@dataclass
class SweepRow:
    """One sweep point's results: its timing rounds, peak MiB, and the path our experts took."""

    cfg: BenchConfig
    timing: Timing
    peak_mib: dict[str, float]
    path: str

    def ratio(self, num: str, den: str) -> float | None:
        return self.timing.ratio(num, den)

    def fine_grained(self) -> bool:
        return self.cfg.experts >= 64 and self.cfg.top_k >= 6


def run_sweep_point(cfg: BenchConfig, warmup: int, reps: int, target: Target, memory: bool) -> SweepRow:
    """Interleaved rounds of ours, DeepSpeed, the drop-in, ``moved`` and ours' twin, all in one process
    (one per EP rank, see SWEEP_PROCESS); then the peak memory of ours, the drop-in and DeepSpeed, each
    in fresh processes (run_memory)."""
    env = SWEEP_MALLOC_ENV if target.device == "cpu" else None
    shared = Implementation(cfg, "+".join(SWEEP_PROCESS), target.for_config(cfg), env=env, wait=False)
    failed: dict[str, str] = {}
    rounds: dict[str, list[float]] = {}
    kept, ds_rows, paths = 0, 0, None
    try:
        shared.wait_ready()
        steps = {name: functools.partial(shared.step, name) for name in SWEEP_PROCESS}
        rounds = time_interleaved(steps, warmup, reps, failed)
        kept, ds_rows = shared.kept_rows, ds_buffer_rows(cfg, shared.busiest_routed)
        paths = shared.request("path")
    except RuntimeError as err:  # the process died (out of memory, a rank's error at EP=2)
        failed = {name: str(err) for name in SWEEP_PROCESS}
        rounds = {}
    finally:
        shared.close()
    peak = {}
    if memory:  # after the timing process is gone; on the path that was timed
        peak = run_memory(cfg, tuple(name for name in SWEEP_MEMORY_IMPLS if name in rounds), target, paths)
    return SweepRow(cfg, Timing(rounds, kept, failed, ds_rows, paths), peak, paths[0] if paths else "-")


def sweep_table(rows: list[SweepRow]) -> str:
    lines = [
        "| point | shape | our path | ours ms | drop-in ms | DeepSpeed ms | DS/ours | DS/drop-in | drop-in/ours "
        "| ours/moved | twin/ours | DS rows/ours | peak MiB ours | peak MiB drop-in | peak MiB DS |",
        "|---" * 15 + "|",
    ]
    for r in rows:
        # In the columns' order (ours, drop-in, DeepSpeed), whatever order the processes ran in.
        peak = ["-" if r.peak_mib.get(n) is None else fmt_mib(r.peak_mib[n]) for n in ("ours", "compat", "deepspeed")]
        failed = f" (failed: {', '.join(sorted(r.timing.failed))})" if r.timing.failed else ""
        lines.append(
            f"| {r.cfg.name}{failed} | {r.cfg.label()} | {r.path} "
            f"| {cell(r.timing.median_ms('ours'), '.1f')} | {cell(r.timing.median_ms('compat'), '.1f')} "
            f"| {cell(r.timing.median_ms('deepspeed'), '.1f')} | {cell(r.ratio('deepspeed', 'ours'), '.2f')} "
            f"| {cell(r.ratio('deepspeed', 'compat'), '.2f')} | {cell(r.ratio('compat', 'ours'), '.2f')} "
            f"| {cell(r.ratio('ours', 'moved'), '.2f')} | {cell(r.ratio('ours_twin', 'ours'), '.2f')} "
            f"| {cell(r.timing.padding_ratio(), '.2f')} | {peak[0]} | {peak[1]} | {peak[2]} |"
        )
    return "\n".join(lines)


def sweep_summary(rows: list[SweepRow]) -> str:
    """Min, median and worst point of each ratio, and how many points meet each target."""

    def stats(values: list[tuple[float, str]], higher_is_better: bool) -> str:
        if not values:
            return "-"
        ordered = sorted(values, reverse=not higher_is_better)
        worst = ordered[0]
        median = statistics.median(v for v, _ in values)
        lo, hi = min(v for v, _ in values), max(v for v, _ in values)
        return f"min {lo:.2f}, median {median:.2f}, max {hi:.2f}; worst {worst[0]:.2f} at {worst[1]}"

    def column(num: str, den: str, only=None) -> list[tuple[float, str]]:
        out = []
        for r in rows:
            value = r.ratio(num, den)
            if value is not None and (only is None or only(r)):
                out.append((value, r.cfg.name))
        return out

    def spread(values: list[tuple[float, str]]) -> str:
        if len(values) < 2:
            return "-"
        deciles = statistics.quantiles([v for v, _ in values], n=10)
        return f"10th-90th percentile {deciles[0]:.2f}-{deciles[-1]:.2f}"

    def count(values: list[tuple[float, str]], ok) -> str:
        return f"{sum(1 for v, _ in values if ok(v))}/{len(values)}"

    ds_ours, ds_compat = column("deepspeed", "ours"), column("deepspeed", "compat")
    fine_ours = column("deepspeed", "ours", SweepRow.fine_grained)
    fine_compat = column("deepspeed", "compat", SweepRow.fine_grained)
    compat_ours = column("compat", "ours")
    ours_moved = column("ours", "moved")
    twin_ours = column("ours_twin", "ours")
    padding = [(v, r.cfg.name) for r in rows if (v := r.timing.padding_ratio()) is not None]
    memory = [r for r in rows if all(n in r.peak_mib for n in SWEEP_MEMORY_IMPLS)]
    lines = [
        "| summary over the sweep | values | target met at |",
        "|---|---|---|",
        f"| DeepSpeed / ours (MoELayer) | {stats(ds_ours, True)} "
        f"| {count(ds_ours, lambda v: v >= 1.0)} points >= 1.0 |",
        f"| DeepSpeed / drop-in (compat.MoE) | {stats(ds_compat, True)} "
        f"| {count(ds_compat, lambda v: v >= 1.0)} points >= 1.0 |",
        f"| fine-grained (E >= 64, k >= 6): DeepSpeed / ours | {stats(fine_ours, True)} "
        f"| {count(fine_ours, lambda v: v >= 1.5)} points >= 1.5 |",
        f"| fine-grained: DeepSpeed / drop-in | {stats(fine_compat, True)} "
        f"| {count(fine_compat, lambda v: v >= 1.5)} points >= 1.5 |",
        f"| drop-in / ours | {stats(compat_ours, False)} | {count(compat_ours, lambda v: v <= 1.03)} points <= 1.03 |",
        f"| ours / moved | {stats(ours_moved, False)} | {count(ours_moved, lambda v: v <= 1.05)} points <= 1.05 |",
        f"| twin / ours (identical code: the run's resolution) | {stats(twin_ours, False)}; {spread(twin_ours)} "
        f"| {count(twin_ours, lambda v: abs(v - 1.0) <= 0.03)} points within 3% of 1.00 |",
        f"| DeepSpeed's expert rows / ours (DS / ours if both ran only their expert GEMMs) | {stats(padding, True)} "
        f"| {count(padding, lambda v: v >= 1.25)} points >= 1.25 |",
        f"| peak memory ours <= DeepSpeed's | - "
        f"| {sum(1 for r in memory if r.peak_mib['ours'] <= r.peak_mib['deepspeed'])}/{len(memory)} points |",
        f"| peak memory drop-in <= DeepSpeed's | - "
        f"| {sum(1 for r in memory if r.peak_mib['compat'] <= r.peak_mib['deepspeed'])}/{len(memory)} points |",
    ]
    return "\n".join(lines)


def sweep_row_json(row: SweepRow) -> dict:
    """One sweep point's results as plain data."""
    return {
        "config": dataclasses.asdict(row.cfg),
        "label": row.cfg.label(),
        "path": row.path,
        "median_ms": {n: row.timing.median_ms(n) for n in SWEEP_PROCESS},
        "ratios": {
            "deepspeed/ours": row.ratio("deepspeed", "ours"),
            "deepspeed/compat": row.ratio("deepspeed", "compat"),
            "compat/ours": row.ratio("compat", "ours"),
            "ours/moved": row.ratio("ours", "moved"),
            "ours_twin/ours": row.ratio("ours_twin", "ours"),
        },
        "kept_rows": row.timing.kept_rows,
        "deepspeed_rows": row.timing.deepspeed_rows,
        "peak_mib": row.peak_mib,
        "failed": row.timing.failed,
        "rounds_s": row.timing.rounds,
    }


def run_sweep(args: argparse.Namespace, argv: list[str]) -> None:
    """``make bench-sweep``: every point in turn; the results block is rewritten after each point
    (unless ``--no-write``), so that a run cut short still leaves the points it measured."""
    target = Target(device=args.device, dtype=args.dtype, threads=args.threads, expert_gemm=args.expert_gemm)
    points = sweep_points(
        args.sweep_points, quick=args.quick, target_s=args.sweep_target_s, device=args.device, seed=args.sweep_seed
    )
    if args.sweep_only:
        wanted = {n.strip() for n in args.sweep_only.split(",")}
        points = [p for p in points if p.name in wanted]
    points = runnable_on(points, args.device)
    block = sweep_block(args.device, args.dtype, args.sweep_seed)
    machine = machine_line(target.device, target.dtype, target.threads)
    rows: list[SweepRow] = []
    loads: list[float] = []
    started = time.monotonic()
    command = command_line(argv)

    def report(final: bool) -> str:
        table = sweep_table(rows) + "\n\n" + sweep_summary(rows)
        if not final:
            table = f"(partial: {len(rows)} of {len(points)} points so far)\n\n" + table
        if not args.no_write:
            load = f"1-minute load average at the points' starts: min {min(loads):.1f}, max {max(loads):.1f}"
            write_results(args.output, block, command, f"{machine}; {load}", table)
        return table

    for i, cfg in enumerate(points):
        loads.append(os.getloadavg()[0])
        print(
            f"== [{i + 1}/{len(points)}, {time.monotonic() - started:.0f} s, load {loads[-1]:.1f}] "
            f"{cfg.name}: {cfg.label()}",
            flush=True,
        )
        rows.append(run_sweep_point(cfg, args.warmup, args.reps, target.for_config(cfg), not args.no_memory))
        print(sweep_table(rows[-1:]).splitlines()[-1], flush=True)
        if i + 1 < len(points):
            report(final=False)
    table = report(final=True)
    print("\n" + table + f"\n\nwall time {time.monotonic() - started:.0f} s")
    if args.json is not None:
        write_json(
            args.json, args, command, machine, table,
            seed=args.sweep_seed, sweep_points=args.sweep_points, points=[sweep_row_json(r) for r in rows],
        )  # fmt: skip
    if not args.no_write:
        print(f"wrote the {block} block of {args.output}")


def merge_sweeps(paths: list[Path], output: Path) -> None:
    """One sweep block from several runs' JSON (e.g. a full run and a rerun of points it lost to
    other load): a point of a later file replaces the same point of an earlier one, in sweep order."""
    runs = [json.loads(p.read_text()) for p in paths]
    # Which sample a run drew: its seed and size (a file without them: the default sample).
    samples = {(run.get("seed", SWEEP_SEED), run.get("sweep_points", 32)) for run in runs}
    if len(samples) > 1:
        raise SystemExit(
            f"--sweep-merge: the runs sampled different points (seed, --sweep-points) {sorted(samples)}; "
            "merge runs of one sample"
        )
    seed, count = samples.pop()
    order = {p.name: i for i, p in enumerate(sweep_points(count, seed=seed))}
    points: dict[str, SweepRow] = {}
    source: dict[str, str] = {}
    for path, run in zip(paths, runs):
        for point in run["points"]:
            cfg = BenchConfig(**point["config"])
            rows = (point.get("kept_rows", 0), point.get("deepspeed_rows", 0))  # 0 where a file lacks them
            timing = Timing(point["rounds_s"], rows[0], point["failed"], rows[1])
            points[cfg.name] = SweepRow(cfg, timing, point["peak_mib"], point["path"])
            source[cfg.name] = path.name
    rows = sorted(points.values(), key=lambda r: order.get(r.cfg.name, len(order)))
    commands = "; ".join(
        f"`{run['command']}` ({', '.join(n for n in source if source[n] == p.name)})" for p, run in zip(paths, runs)
    )
    table = sweep_table(rows) + "\n\n" + sweep_summary(rows)
    machine = runs[-1]["machine"] + f"; merged from {len(runs)} runs by point: {commands}"
    block = sweep_block(runs[-1]["device"], runs[-1]["dtype"], seed)
    write_results(output, block, " + ".join(run["command"] for run in runs), machine, table)
    print(table + f"\n\nwrote the {block} block of {output}")
