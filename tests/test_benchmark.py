"""`make bench` keeps working: its quick mode runs every implementation and prints a full table.

Timings are not checked (they belong in BENCHMARKS.md, not in tests); the table's shape and the
fact that each implementation ran are.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_moe, moe_compare, moe_sweep
from benchmarks.harness import configs, peers
from benchmarks.harness.rounds import Timing, balanced_orders, time_interleaved

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "dtype, configs", [("float32", ("c2", "ep2")), pytest.param("bfloat16", ("c2",), marks=pytest.mark.slow)]
)
def test_quick_benchmark_runs_every_implementation(tmp_path: Path, dtype: str, configs: tuple[str, ...]) -> None:
    output = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_moe.py", "--quick", "--configs", ",".join(configs), "--no-memory"]
        + ["--dtype", dtype, "--output", str(output), "--json", str(tmp_path / "run.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\| (c2|ep2): T=", line)]
    assert {row.split(":")[0] for row in rows} == {f"| {name}" for name in configs}, proc.stdout[-4000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| config |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for row in rows:
        cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
        for column in ("ours ms", "DeepSpeed ms", "floor ms", "moved ms", "ours/floor", "ours/moved"):
            assert float(cells[column]) > 0, (column, row)
    assert not output.exists()  # --quick never writes the results page
    results = json.loads((tmp_path / "run.json").read_text())
    assert (results["dtype"], results["device"]) == (dtype, "cpu")
    assert "benchmarks/bench_moe.py --quick" in results["command"] and "cpu" in results["machine"].lower()
    assert len(results["rows"]) == len(configs) and header in results["markdown"]


@pytest.mark.parametrize("n", range(1, 10))
def test_round_orders_put_each_implementation_after_each_other_equally_often(n: int) -> None:
    orders = balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)  # a round runs each one once
    cycle = [i for order in orders for i in order]
    after = collections.Counter(zip(cycle, cycle[1:] + cycle[:1])) if n > 1 else collections.Counter()
    assert all(a != b for a, b in after) and len(after) == n * (n - 1) and set(after.values()) <= {1}
    # The rounds as timed: warm-up rounds lead into the first timed one as the cycle does.
    ran: list[str] = []
    names = [f"impl{i}" for i in range(n)]
    steps = {name: (lambda name=name: ran.append(name) or 0.001) for name in names}
    reps = 2 * len(orders)
    rounds = time_interleaved(steps, warmup=1, reps=reps, failed={})
    assert all(len(rounds[name]) == reps for name in names)
    timed = ran[n:]
    after = collections.Counter(zip(ran[n - 1 :], timed))
    if n > 1:
        assert {after[(a, b)] for a in names for b in names if a != b} == {2}


def test_device_and_dtype_pick_their_own_results_block() -> None:
    assert moe_compare.results_block(bench_moe.parse_args([])) == "default"
    assert moe_compare.results_block(bench_moe.parse_args(["--tuned-malloc"])) == "tuned-malloc"
    assert moe_compare.results_block(bench_moe.parse_args(["--dtype", "bfloat16"])) == "cpu-bfloat16"
    cuda = bench_moe.parse_args(["--device", "cuda"])
    assert (cuda.dtype, moe_compare.results_block(cuda)) == ("bfloat16", "cuda-bfloat16")
    assert moe_compare.results_block(bench_moe.parse_args(["--expert-gemm", "grouped"])) == "default-grouped"


def test_gpu_run_refuses_cpu_only_options_and_a_missing_gpu(capsys) -> None:
    with pytest.raises(SystemExit):
        bench_moe.parse_args(["--device", "cuda", "--profile"])
    assert "--profile and --tuned-malloc are CPU measurements" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            moe_compare.selected_configs(bench_moe.parse_args(["--device", "cuda"]))


@pytest.mark.slow  # ~23 s; make test keeps the quick side-by-side run and the sweep's sampling and table tests
def test_quick_sweep_runs_ours_the_drop_in_and_deepspeed_per_point(tmp_path: Path) -> None:
    """`--sweep --quick`: the sweep's machinery (T from the estimate aside) on a tiny EP=1 and EP=2 point."""
    output = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_moe.py", "--sweep", "--quick", "--sweep-only", "q2,q1-ep2"]
        + ["--reps", "2", "--output", str(output), "--json", str(tmp_path / "sweep.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| point |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in lines:
        if re.match(r"\| (q2|q1-ep2) \|", line):
            rows[line.split("|")[1].strip()] = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
    assert set(rows) == {"q2", "q1-ep2"}, proc.stdout[-4000:]
    assert "EP=2" in rows["q1-ep2"]["shape"] and "dropless" in rows["q2"]["shape"]
    for row in rows.values():
        assert row["our path"] in ("loop", "padded")
        for column in (
            "ours ms",
            "drop-in ms",
            "DeepSpeed ms",
            "DS/ours",
            "DS/drop-in",
            "drop-in/ours",
            "ours/moved",
            "twin/ours",
        ):
            assert float(row[column]) > 0, (column, row)
        assert float(row["DS rows/ours"]) >= 1.0, row  # padding only adds rows
        for column in ("peak MiB ours", "peak MiB drop-in", "peak MiB DS"):
            float(row[column])  # measured (tiny shapes may need less than a page more)
    summary = [line for line in lines if line.startswith("| DeepSpeed / ours (MoELayer) |")]
    assert summary and "worst" in summary[-1] and "/2 points >= 1.0" in summary[-1]
    assert not output.exists()  # --quick never writes the results page
    results = json.loads((tmp_path / "sweep.json").read_text())
    assert {point["config"]["name"] for point in results["points"]} == {"q2", "q1-ep2"}
    assert header in results["markdown"]


@pytest.mark.parametrize("seed, count", [(None, 32), (2026, 16), (5, 40)])
def test_sweep_sampling_is_deterministic_balanced_and_sized_by_the_estimate(seed: int | None, count: int) -> None:
    bench = moe_sweep
    seed = bench.SWEEP_SEED if seed is None else seed
    points = bench.sweep_points(count, seed=seed)
    assert points == bench.sweep_points(count, seed=seed)  # seeded
    if seed != bench.SWEEP_SEED:  # another seed: another sample of the same space, in a block of its own
        assert points[:count] != bench.sweep_points(count)[:count]
        assert bench.sweep_block("cpu", "float32", seed) == f"sweep-seed{seed}"
    single = [p for p in points if p.ep_size == 1 and p.name.startswith("s")]
    assert len(single) == count and sum(p.ep_size == 2 for p in points) >= 2
    for axis, values in (
        ("experts", bench.SWEEP_EXPERTS),
        ("top_k", bench.SWEEP_TOP_K),
        ("hidden", bench.SWEEP_HIDDEN),
        ("capacity_factor", bench.SWEEP_CAPACITY),
        ("drop_policy", bench.SWEEP_POLICY),
    ):
        seen = [getattr(p, axis) for p in single]
        per_value = [seen.count(v) for v in values]
        assert min(per_value) >= len(single) // len(values), (axis, per_value)  # every value, evenly
    assert {p.ffn / p.hidden for p in single} == set(bench.SWEEP_FFN_RATIO)
    if seed == bench.SWEEP_SEED:
        assert any(p.experts >= 64 and p.top_k >= 6 for p in single)  # fine-grained shapes are in
    # T follows the estimate: more work per token, fewer tokens (within the clamp).
    light = bench.sweep_tokens(256, 128, 1, 1.0, 8)
    heavy = bench.sweep_tokens(1024, 4096, 8, 2.0, 8)
    assert light > heavy >= 256 and light <= 32768 and light % 64 == 0


def test_sweep_table_puts_each_measurement_under_its_own_column() -> None:
    cfg = configs.BenchConfig("p1", 512, 32, 64, 8, 2, 1.25)
    rounds = {
        "ours": [0.1, 0.1],
        "compat": [0.2, 0.2],
        "deepspeed": [0.4, 0.4],
        "moved": [0.05, 0.05],
        "ours_twin": [0.11, 0.11],
    }
    timing = Timing(rounds, 400, deepspeed_rows=500)
    row = moe_sweep.SweepRow(cfg, timing, {"deepspeed": 30.0, "ours": 10.0, "compat": 20.0}, "loop")
    lines = moe_sweep.sweep_table([row]).splitlines()
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = dict(zip(columns, (c.strip() for c in lines[2].strip("|").split("|"))))
    assert (cells["peak MiB ours"], cells["peak MiB drop-in"], cells["peak MiB DS"]) == ("10", "20", "30")
    assert (cells["ours ms"], cells["drop-in ms"], cells["DeepSpeed ms"]) == ("100.0", "200.0", "400.0")
    assert (cells["DS/ours"], cells["DS/drop-in"], cells["drop-in/ours"], cells["ours/moved"]) == (
        "4.00",
        "2.00",
        "2.00",
        "2.00",
    )
    assert cells["twin/ours"] == "1.10"
    assert cells["DS rows/ours"] == "1.25"


def _sweep_run_json(bench, cfgs, ours_s: float, seed: int | None, count: int = 8) -> dict:
    rounds = {"ours": [ours_s] * 2, "compat": [0.2] * 2, "deepspeed": [0.4] * 2, "moved": [0.05] * 2}
    rounds["ours_twin"] = [ours_s] * 2
    rows = [bench.SweepRow(c, Timing(rounds, 400, deepspeed_rows=500), {"ours": 1.0}, "loop") for c in cfgs]
    run = {"command": f"run ours={ours_s}", "machine": "test", "device": "cpu", "dtype": "float32"}
    run["points"] = [bench.sweep_row_json(r) for r in rows]
    if seed is not None:  # files written before --sweep-seed have neither: the default sample
        run["seed"], run["sweep_points"] = seed, count
    return run


@pytest.mark.parametrize("seed", [None, 2026])
def test_merging_sweep_runs_takes_each_point_from_its_latest_run(tmp_path: Path, seed: int | None) -> None:
    bench = moe_sweep
    points = bench.sweep_points(32 if seed is None else 8, seed=bench.SWEEP_SEED if seed is None else seed)
    first, rerun = tmp_path / "a.json", tmp_path / "b.json"
    ep2 = [p for p in points if p.ep_size == 2][:1]  # named as the sample it was drawn from names it
    first.write_text(json.dumps(_sweep_run_json(bench, [*ep2, *points[:4]], 0.1, seed)))
    rerun.write_text(json.dumps(_sweep_run_json(bench, [points[2]], 0.2, seed)))
    output = tmp_path / "BENCHMARKS.md"
    bench.merge_sweeps([first, rerun], output)
    block = "sweep" if seed is None else f"sweep-seed{seed}"
    text = output.read_text()
    assert f"<!-- bench_moe {block} begin -->" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if re.match(r"\| s\d", line)}
    assert list(rows) == [p.name for p in [*points[:4], *ep2]]  # in the sample's order, each point once
    assert "| 200.0 |" in rows[points[2].name] and "| 100.0 |" in rows[points[0].name]
    other = tmp_path / "c.json"
    for other_seed, other_count in ((7, 8), (seed or bench.SWEEP_SEED, 16)):
        other.write_text(json.dumps(_sweep_run_json(bench, points[:1], 0.1, other_seed, other_count)))
        with pytest.raises(SystemExit, match="different points"):
            bench.merge_sweeps([first, other], output)


def test_deepspeed_rows_are_its_padded_capacity_or_the_busiest_expert_when_dropless() -> None:
    capped = configs.BenchConfig("p1", 4096, 32, 64, 8, 2, 1.25)
    assert configs.ds_buffer_rows(capped, busiest_routed=4000) == 8 * 1280  # ceil(4096 * 2 / 8 * 1.25)
    dropless = configs.BenchConfig("p2", 4096, 32, 64, 8, 2, None)
    assert configs.ds_buffer_rows(dropless, busiest_routed=1100) == 8 * 1100
    assert configs.ds_buffer_rows(dataclasses.replace(dropless, ep_size=2), busiest_routed=600) == 2 * 8 * 600
    assert Timing({}, 0).padding_ratio() is None  # no rows known: no ratio


@pytest.mark.parametrize("path", ["loop", "padded", "grouped"])
def test_pinning_a_path_reaches_ours_the_drop_in_and_moved(path: str) -> None:
    """The sweep's memory processes run the path the timing process took: ``pin_expert_path`` sets it
    on every experts module a step runs (ours, ``moved``, the drop-in's stacked experts), also after
    ``auto`` resolved theirs in a first step."""
    cfg = configs.BenchConfig("tiny", 64, 16, 32, 4, 2, 1.25)
    problem = peers.make_problem(cfg)
    steps = [peers.BUILDERS[name](problem) for name in ("ours", "moved", "compat")]
    for step in steps:
        step()  # auto resolves
        step.pin_expert_path(path)
    for step in steps:
        experts = [m for module in step.modules for m in module.modules() if hasattr(m, "execution_path")]
        assert experts  # every step names the experts it runs
        for module in experts:
            assert module.execution_path(problem.x_TD) == path
    for step in steps:
        step()  # and they run


def test_moved_and_the_floor_compute_on_the_rows_ours_keeps() -> None:
    """``moved`` is ours with the routing fixed: the same output and expert gradients on that input;
    the floor's rows are the kept ones, grouped by expert."""
    cfg = configs.BenchConfig("tiny", 96, 16, 32, 4, 2, 1.0)
    problem = peers.make_problem(cfg)
    plan = peers.routing_plan(problem)
    rows, counts = peers.routed_rows(problem, plan)
    assert counts == plan.tokens_per_expert_E.tolist() and rows.shape[0] == sum(counts) < 96 * 2  # drops
    kept = plan.token_idx_A[: sum(counts)]
    assert torch.equal(rows, problem.x_TD[kept])
    assert peers.row_counts(problem) == (sum(counts), int(plan.routed_per_expert_E.max()))
    grads = []
    for step in (peers.build_moved(problem), peers.build_ours(problem)):
        step()
        grads.append([p.grad.clone() for p in problem.layer.experts.parameters()])
    for moved_grad, ours_grad in zip(*grads, strict=True):
        torch.testing.assert_close(moved_grad, ours_grad)
    floor = peers.build_floor(problem)
    floor()
    assert [x.shape[0] for x in floor.leaves[: len(counts)]] == counts


def test_calibrate_writes_the_cost_file_the_experts_pin(tmp_path: Path, monkeypatch, capsys) -> None:
    """``--calibrate PATH`` writes experts/choice.py's calibration file (its measurement made small
    here), which ``MOE_PARALLEL_EXPERT_COST`` then pins."""
    real = bench_moe.choice.calibrate
    monkeypatch.setattr(bench_moe.choice, "calibrate", lambda: real(reps=1, hidden=64, ffn=64))
    path = tmp_path / "cost.json"
    bench_moe.main(["--calibrate", str(path)])
    out = capsys.readouterr().out
    assert f"measured ({torch.get_num_threads()} threads)" in out and "defaults:" in out
    monkeypatch.setenv(bench_moe.choice.COST_FILE_ENV, str(path))
    model = bench_moe.choice.cost_model()
    assert dataclasses.asdict(model) == {k: float(v) for k, v in json.loads(path.read_text()).items()}
    assert model.gemm_flops > 0 and model.move_bytes_per_s > 0
