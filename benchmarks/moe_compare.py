"""The side-by-side comparison of ``make bench``: ours, DeepSpeed, the floor and ``moved`` per config
(and the DeepSpeed drop-in's rows), its table, its JSON and its results block.

Times are medians over interleaved rounds of live processes, one process (group) per
implementation (``harness.rounds``, ``harness.workers``); peak memory comes from fresh processes
on CPU (``moe_memory``) and from the timing processes' CUDA allocator on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from benchmarks.harness.configs import (
    CONFIGS,
    QUICK_CONFIGS,
    BenchConfig,
    Target,
    ds_buffer_rows,
    expert_gemm_flops,
    runnable_on,
)
from benchmarks.harness.peers import IMPLS
from benchmarks.harness.report import cell, command_line, fmt_mib, machine_line, write_json, write_results
from benchmarks.harness.rounds import Timing, time_interleaved
from benchmarks.harness.workers import TUNED_MALLOC_ENV, Implementation, start_implementations
from benchmarks.moe_memory import MEMORY_IMPLS, run_memory, step_peak_mib

COMPAT_IMPLS = ("deepspeed", "compat_module", "compat_parallel_mlp")  # the DeepSpeed drop-in's rows
RATIOS = (("ours", "floor"), ("deepspeed", "floor"), ("deepspeed", "ours"), ("moved", "floor"))


def target_of(args: argparse.Namespace) -> Target:
    return Target(device=args.device, dtype=args.dtype, threads=args.threads, expert_gemm=args.expert_gemm)


def selected_configs(args: argparse.Namespace) -> list[BenchConfig]:
    """The configs ``--configs`` names (``--quick``: their tiny versions) that this machine can run."""
    table = QUICK_CONFIGS if args.quick else CONFIGS
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {sorted(table)}")
    return runnable_on([table[n] for n in names], device=args.device)


def results_block(args: argparse.Namespace) -> str:
    """Which results block of BENCHMARKS.md a run writes: one per device and dtype (and allocator)."""
    if args.tuned_malloc:
        return "tuned-malloc"
    block = "default" if (args.device, args.dtype) == ("cpu", "float32") else f"{args.device}-{args.dtype}"
    return block if args.expert_gemm == "auto" else f"{block}-{args.expert_gemm}"


def run_timing(
    cfg: BenchConfig, warmup: int, reps: int, target: Target, cuda_memory: bool = False
) -> tuple[Timing, dict[str, float] | None]:
    """Interleaved rounds over one live process (group) per implementation.

    ``cuda_memory``: also the peak memory of one step, read from the CUDA allocator of the same
    processes (exact per process, so no fresh process is needed as on CPU).
    """
    impls, failed = start_implementations(cfg, IMPLS, target)
    try:
        paths = impls["ours"].request("path") if "ours" in impls else None
        if paths and "moved" in impls:
            # moved is ours without the routing: the same expert path on every rank as ours' layer
            # (experts/choice.py), whatever its own experts alone would resolve.
            impls["moved"].request("expert_gemm:" + ",".join(paths))
        steps = {name: impl.step for name, impl in impls.items()}
        rounds = time_interleaved(steps, warmup, reps, failed)
        any_impl = next(iter(impls.values()), None)
        kept = any_impl.kept_rows if any_impl else 0
        ds_rows = ds_buffer_rows(cfg, any_impl.busiest_routed) if any_impl else 0
        peak = None
        if cuda_memory:
            peak = {}
            for name in MEMORY_IMPLS:
                if name in rounds:
                    try:
                        peak[name] = max(impls[name].measure(step_peak_mib))
                    except RuntimeError as err:
                        failed[name] = f"peak memory: {err}"
        return Timing(rounds, kept, failed, ds_rows, paths), peak
    finally:
        for impl in impls.values():
            impl.close()


def run_compat_timing(cfg: BenchConfig, warmup: int, reps: int, target: Target) -> Timing:
    """Interleaved rounds of DeepSpeed's layer and the drop-in with both expert kinds."""
    impls = {name: Implementation(cfg, name, target.for_config(cfg)) for name in COMPAT_IMPLS}
    try:
        rounds = time_interleaved({name: impl.step for name, impl in impls.items()}, warmup, reps)
        ds = impls["deepspeed"]
        return Timing(rounds, ds.kept_rows, deepspeed_rows=ds_buffer_rows(cfg, ds.busiest_routed))
    finally:
        for impl in impls.values():
            impl.close()


def compat_table(rows: list[tuple[BenchConfig, Timing]]) -> str:
    """The DeepSpeed drop-in against DeepSpeed's own layer (same gate settings and weights)."""
    lines = [
        "| config | DeepSpeed ms | drop-in, module-copy expert ms | drop-in, ParallelMLP expert ms "
        "| DeepSpeed / drop-in (module copies) | DeepSpeed / drop-in (ParallelMLP) |",
        "|---|---|---|---|---|---|",
    ]
    for cfg, t in rows:
        lines.append(
            f"| {cfg.name} (drop-in): {cfg.label()} | {t.median_ms('deepspeed'):.1f} "
            f"| {t.median_ms('compat_module'):.1f} | {t.median_ms('compat_parallel_mlp'):.1f} "
            f"| {t.ratio('deepspeed', 'compat_module'):.2f} | {t.ratio('deepspeed', 'compat_parallel_mlp'):.2f} |"
        )
    return "\n".join(lines)


@dataclass
class Row:
    """One config's results: its timing rounds and peak MiB per implementation."""

    cfg: BenchConfig
    timing: Timing
    peak_mib: dict[str, float] | None


def tflops(row: Row, impl: str) -> float | None:
    """Achieved TFLOP/s of the expert GEMMs (see :func:`expert_gemm_flops`) at ``impl``'s median step."""
    ms = row.timing.median_ms(impl)
    return None if ms is None else expert_gemm_flops(row.cfg, row.timing.kept_rows) / (ms * 1e-3) / 1e12


def markdown_table(rows: list[Row], peak_tflops: float | None = None) -> str:
    """The results table; with ``peak_tflops`` (GPU runs) also the expert GEMMs' TFLOP/s and % of it."""
    head = (
        "| config | kept rows (ours / DS buffer) | ours ms | DeepSpeed ms | floor ms | moved ms "
        "| ours/floor | DS/floor | DS/ours | moved/floor | ours/moved "
        "| peak MiB ours | peak MiB DS | peak MiB floor |"
    )
    if peak_tflops:
        head += f" TFLOP/s ours | TFLOP/s DS | TFLOP/s floor | ours % of {peak_tflops:g} | floor % of {peak_tflops:g} |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    notes = []
    for row in rows:
        t = row.timing
        mem = row.peak_mib or {}
        mem_cells = [fmt_mib(mem[i]) if i in mem else "-" for i in MEMORY_IMPLS]
        line = (
            f"| {row.cfg.name}: {row.cfg.label()} | {t.kept_rows} / {t.deepspeed_rows} "
            + "".join(f"| {cell(t.median_ms(i), '.1f')} " for i in IMPLS)
            + "".join(f"| {cell(t.ratio(a, b), '.2f')} " for a, b in RATIOS)
            + f"| {cell(t.ratio('ours', 'moved'), '.2f')} | {' | '.join(mem_cells)} |"
        )
        if peak_tflops:
            rates = [tflops(row, i) for i in ("ours", "deepspeed", "floor")]
            pcts = [None if r is None else 100 * r / peak_tflops for r in (rates[0], rates[2])]
            line += "".join(f" {cell(r, '.3g')} |" for r in rates) + "".join(f" {cell(p, '.1f')} |" for p in pcts)
        lines.append(line)
        notes += [
            f"- {row.cfg.name}: {impl} failed: {reason.splitlines()[0][:300]}" for impl, reason in t.failed.items()
        ]
    return "\n".join(lines + ([""] + notes if notes else []))


def row_json(row: Row, peak_tflops: float | None = None) -> dict:
    """One config's results as plain data (the GPU check's results file)."""
    t = row.timing
    return {
        "config": dataclasses.asdict(row.cfg),
        "label": row.cfg.label(),
        "kept_rows": t.kept_rows,
        "deepspeed_buffer_rows": t.deepspeed_rows,
        "median_ms": {i: t.median_ms(i) for i in IMPLS},
        "ratios": {f"{a}/{b}": t.ratio(a, b) for a, b in RATIOS + (("ours", "moved"),)},
        "peak_mib": row.peak_mib,
        "expert_gemm_tflop_per_step": expert_gemm_flops(row.cfg, t.kept_rows) / 1e12,
        "tflops": {i: tflops(row, i) for i in IMPLS},
        "peak_tflops": peak_tflops,
        "failed": t.failed,
        "rounds_s": t.rounds,
    }


def run_config(cfg: BenchConfig, args: argparse.Namespace) -> Row:
    """One config's timing and peak memory, its table row printed as soon as it is measured."""
    print(f"== {cfg.name}: {cfg.label()}", flush=True)
    target = target_of(args)
    on_gpu = target.device == "cuda"
    timing, peak = run_timing(cfg, args.warmup, args.reps, target, cuda_memory=on_gpu and not args.no_memory)
    if not on_gpu and not args.no_memory:
        peak = run_memory(
            cfg, tuple(impl for impl in MEMORY_IMPLS if impl not in timing.failed), target, timing.expert_paths
        )
    row = Row(cfg, timing, peak)
    print(markdown_table([row], args.peak_tflops), flush=True)
    return row


def run_compare(args: argparse.Namespace, argv: list[str]) -> None:
    """``make bench``: the drop-in's rows (unless ``--compat off``), then every config's row; prints the
    tables and writes the JSON (``--json``) and the results block (unless ``--no-write``)."""
    target = target_of(args)
    compat_rows = []
    if args.compat in ("on", "only") or (args.compat == "auto" and not args.quick):
        for cfg in selected_configs(args):
            compat_rows.append((cfg, run_compat_timing(cfg, args.warmup, args.reps, target)))
            print(compat_table(compat_rows[-1:]), flush=True)
    if args.compat == "only":
        print("\n" + compat_table(compat_rows))
        return
    rows = [run_config(cfg, args) for cfg in selected_configs(args)]
    table = markdown_table(rows, args.peak_tflops)
    if compat_rows:
        table += "\n\n" + compat_table(compat_rows)
    print("\n" + table)
    command = command_line(argv)
    machine = machine_line(target.device, target.dtype, target.threads)
    if args.json is not None:
        write_json(
            args.json, args, command, machine, table,
            expert_gemm=args.expert_gemm, reps=args.reps, warmup=args.warmup,
            rows=[row_json(row, args.peak_tflops) for row in rows],
        )  # fmt: skip
    if not args.no_write:
        block = results_block(args)
        note = ""
        if args.tuned_malloc:
            note = "re-executes itself under `" + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC_ENV.items()) + "`"
        write_results(args.output, block, command, machine, table, note)
        print(f"wrote the {block} block of {args.output}")
