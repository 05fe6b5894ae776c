"""`make bench` keeps working: its quick mode runs every implementation and prints a full table.

Timings are not checked (they belong in BENCHMARKS.md, not in tests); the table's shape and the
fact that each implementation ran are.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_every_implementation(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_moe.py", "--quick", "--configs", "c2,ep2", "--no-memory"]
        + ["--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\| (c2|ep2): T=", line)]
    assert {row.split(":")[0] for row in rows} == {"| c2", "| ep2"}, proc.stdout[-4000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| config |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for row in rows:
        cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
        for column in ("ours ms", "DeepSpeed ms", "floor ms", "moved ms", "ours/floor", "ours/moved"):
            assert float(cells[column]) > 0, (column, row)
    assert not output.exists()  # --quick never writes the results page
