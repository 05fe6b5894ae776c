"""`make bench` keeps working: its quick mode runs every implementation and prints a full table.

Timings are not checked (they belong in BENCHMARKS.md, not in tests); the table's shape and the
fact that each implementation ran are.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype, configs", [("float32", ("c2", "ep2")), ("bfloat16", ("c2",))])
def test_quick_benchmark_runs_every_implementation(tmp_path: Path, dtype: str, configs: tuple[str, ...]) -> None:
    output = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_moe.py", "--quick", "--configs", ",".join(configs), "--no-memory"]
        + ["--dtype", dtype, "--output", str(output)],
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


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_moe", REPO / "benchmarks" / "bench_moe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_device_and_dtype_pick_their_own_results_block() -> None:
    bench = _bench_module()
    assert bench.results_block(bench.parse_args([])) == "default"
    assert bench.results_block(bench.parse_args(["--tuned-malloc"])) == "tuned-malloc"
    assert bench.results_block(bench.parse_args(["--dtype", "bfloat16"])) == "cpu-bfloat16"
    cuda = bench.parse_args(["--device", "cuda"])
    assert (cuda.dtype, bench.results_block(cuda)) == ("bfloat16", "cuda-bfloat16")
    assert bench.results_block(bench.parse_args(["--expert-gemm", "grouped"])) == "default-grouped"


def test_gpu_run_refuses_cpu_only_options_and_a_missing_gpu(capsys) -> None:
    bench = _bench_module()
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda", "--profile"])
    assert "--profile and --tuned-malloc are CPU measurements" in capsys.readouterr().err
    if not bench.torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            bench.selected_configs(bench.parse_args(["--device", "cuda"]))
