"""Forward+backward of moe_parallel.MoELayer vs DeepSpeed's MoE vs the expert-GEMM floor.

The command line of ``make bench`` and ``make bench-sweep``; each tool lives in its own module
over the shared harness (``benchmarks/harness/``):

- the side-by-side comparison (default): ``moe_compare.py``;
- peak memory in fresh processes: ``moe_memory.py`` (``--no-memory`` skips it);
- profiler categories (``--profile``): ``moe_profile.py``;
- the sampled shape sweep and the merge of sweep runs (``--sweep``, ``--sweep-merge``): ``moe_sweep.py``;
- calibration of the expert cost model (``--calibrate PATH``): ``moe_calibrate.py``;
- the communication report (``--comm``): ``bench_comm.py``.

CPU in fp32 by default; ``--device cuda`` runs the same comparison on a GPU in bf16 (NCCL for EP=2,
which needs a GPU per rank), with peak memory from the CUDA allocator's statistics.

For every config, four implementations run on the same input:

- ``ours``: :class:`moe_parallel.MoELayer` (GELU experts, no bias, ``drop_policy="position"``);
- ``deepspeed``: ``deepspeed.moe.layer.MoE`` with the same sizes, gate weights and expert weights;
- ``floor``: the expert GEMMs alone on the rows our router keeps for that input, pre-gathered into
  one contiguous tensor per expert: a plain autograd loop ``y_e = gelu(x_e @ W1[e]) @ W2[e]``;
- ``moved``: the floor's GEMMs plus the token movement that any routed layer adds on top of them,
  with the routing fixed in advance: every step our dispatcher gathers each expert's rows from ``x``
  and adds its output, times the plan's fixed combine weight, into ``y`` (and the reverse in
  backward); at EP=2 the two all-to-alls too. No router, no capacity plan, no gradient into the
  combine weights: what is left between ``moved`` and ``ours`` is the routing itself.

Times are medians over interleaved repetitions in one process per implementation (the order
changes every repetition, so background load hits all implementations alike, and each runs after
each other one equally often). Peak memory is measured in a fresh subprocess per implementation.
Config ``ep2`` is expert parallelism over two processes (gloo on CPU, NCCL on GPU): the global
batch of ``c1``, half of its tokens on each rank.

    .venv/bin/python benchmarks/bench_moe.py                  # everything, writes BENCHMARKS.md
    .venv/bin/python benchmarks/bench_moe.py --quick          # small smoke run, writes nothing
    .venv/bin/python benchmarks/bench_moe.py --configs c2 --reps 15 --no-memory --no-write
    .venv/bin/python benchmarks/bench_moe.py --tuned-malloc   # same, glibc keeps freed memory
    .venv/bin/python benchmarks/bench_moe.py --device cuda    # GPU, bf16: its own BENCHMARKS.md block
    .venv/bin/python benchmarks/bench_moe.py --device cuda --configs c1,c2,c3,large --json out.json
    .venv/bin/python benchmarks/bench_moe.py --sweep          # the shape sweep (make bench-sweep)
    .venv/bin/python benchmarks/bench_moe.py --comm           # collectives, bytes, host syncs: bench_comm.py

Config ``large`` (named only, not in the default set) fills a GPU: the layer shape of a 16B
fine-grained MoE model (T=65536, D=2048, F=1408, E=64, k=6). On a GPU the floor is the two grouped
GEMMs alone on pre-gathered, pre-aligned rows, and the table adds the achieved TFLOP/s of the expert
GEMMs (``12 * kept rows * D * F`` per forward+backward) against ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness.configs import DEFAULT_CONFIGS, H200_BF16_TFLOPS  # noqa: E402
from benchmarks.harness.workers import TUNED_MALLOC_ENV, reexec_under  # noqa: E402
from benchmarks.moe_compare import run_compare, selected_configs, target_of  # noqa: E402
from benchmarks.moe_sweep import SWEEP_SEED, SWEEP_TARGET_S  # noqa: E402
from moe_parallel.experts import choice  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma-separated subset of c1,c2,c3,ep2,large (default: {DEFAULT_CONFIGS})",
    )
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions per implementation (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for EP=1 (default: torch's choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument(
        "--expert-gemm",
        choices=("auto", "grouped", "loop", "padded"),
        default="auto",
        help="our experts' path (default auto)",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None, help="default: float32 on CPU, bfloat16 on GPU"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 reps, BENCHMARKS.md left alone")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument(
        "--compat",
        choices=("auto", "on", "off", "only"),
        default="auto",
        help="the DeepSpeed drop-in rows (default auto: on, off with --quick; only: nothing else, printed only)",
    )
    parser.add_argument(
        "--tuned-malloc", action="store_true", help="rerun under TUNED_MALLOC_ENV (its own block in BENCHMARKS.md)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print a torch.profiler breakdown per config instead of timing"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="the sampled shape sweep (ours, drop-in, DeepSpeed; its own block)"
    )
    parser.add_argument(
        "--calibrate",
        type=Path,
        default=None,
        metavar="PATH",
        help="measure the expert cost model's constants here (--threads applies) and write them to PATH, "
        f"the JSON file that {choice.COST_FILE_ENV}=PATH pins",
    )
    parser.add_argument("--sweep-points", type=int, default=32, help="sampled EP=1 points of --sweep (default 32)")
    parser.add_argument(
        "--sweep-target-s",
        type=float,
        default=SWEEP_TARGET_S,
        help=f"estimated DeepSpeed step that sizes each point's T (default {SWEEP_TARGET_S})",
    )
    parser.add_argument(
        "--sweep-seed",
        type=int,
        default=SWEEP_SEED,
        help=f"seed of the sampled points (default {SWEEP_SEED}; another seed: a held-out sample, its own block)",
    )
    parser.add_argument("--sweep-only", default=None, help="comma-separated point names: run only these")
    parser.add_argument(
        "--sweep-merge",
        default=None,
        help="comma-separated --json files of sweep runs: write their points as one sweep block (a point "
        "in a later file replaces the same point in an earlier one; runs nothing)",
    )
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help=f"reference rate of the TFLOP/s columns (GPU default: {H200_BF16_TFLOPS:g}, the H200 dense bf16 GEMM)",
    )
    args = parser.parse_args(argv)
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = H200_BF16_TFLOPS
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cuda" and (args.profile or args.tuned_malloc):
        parser.error("--profile and --tuned-malloc are CPU measurements; drop them with --device cuda")
    if args.quick:
        args.reps, args.warmup, args.no_write = min(args.reps, 3), 1, True
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--comm" in argv:  # the communication report: benchmarks/bench_comm.py takes the other arguments
        from benchmarks import bench_comm

        bench_comm.main([a for a in argv if a != "--comm"])
        return
    args = parse_args(argv)
    if args.tuned_malloc:
        reexec_under(TUNED_MALLOC_ENV, __file__, argv)
    if args.calibrate is not None:
        from benchmarks.moe_calibrate import calibrate

        calibrate(args.calibrate, args.threads)
    elif args.sweep_merge:
        from benchmarks.moe_sweep import merge_sweeps

        merge_sweeps([Path(p) for p in args.sweep_merge.split(",")], args.output)
    elif args.sweep:
        from benchmarks.moe_sweep import run_sweep

        run_sweep(args, argv)
    elif args.profile:
        from benchmarks.moe_profile import run_profile

        for cfg in selected_configs(args):
            print(run_profile(cfg, target_of(args)) + "\n", flush=True)
    else:
        run_compare(args, argv)


if __name__ == "__main__":
    main()
