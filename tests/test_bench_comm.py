"""The communication report (benchmarks/bench_comm.py) runs and its table has the promised structure.

Only the structure is checked: every layer has rows, every count is a whole number that adds up to
its by-name breakdown, and DeepSpeed's bytes relative to its own are 1. The counts themselves
belong in BENCHMARKS.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("DeepSpeed `MoE`", "ours: `compat.MoE` (drop-in)", "ours: `MoELayer`")
COUNT = re.compile(r"^(\d+)(?: \((.*)\))?$")


def _count(cell: str) -> int:
    """``"8 (all_reduce 1, all_to_all_single 7)"`` -> 8, checking that the breakdown adds up to it."""
    match = COUNT.match(cell)
    assert match, cell
    total = int(match.group(1))
    if match.group(2) is not None:
        assert sum(int(part.rsplit(" ", 1)[1]) for part in match.group(2).split(", ")) == total, cell
    return total


def _rows(text: str) -> list[dict[str, str]]:
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| layer |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = []
    for line in lines:
        if line.startswith("| ") and not line.startswith(("| layer |", "|---")):
            # A cell never holds "|"; the outer pipes are stripped.
            rows.append(dict(zip(columns, (c.strip() for c in line.strip()[1:-1].split(" | ")))))
    return rows


def test_comm_report_has_every_layer_and_whole_counts(tmp_path: Path) -> None:
    out = tmp_path / "comm.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_comm.py", "--shapes", "128x16x32x4", "--write", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert text in proc.stdout
    rows = _rows(text)
    measured = [r for r in rows if r["layer"] in LAYERS]
    assert {r["layer"] for r in measured} == set(LAYERS)
    for layer in LAYERS:  # top-1, top-2 and top-4, each with capacity and dropless
        routings = {r["routing"] for r in measured if r["layer"] == layer}
        assert {f"top-{k} softmax {cf}" for k in (1, 2, 4) for cf in ("cf=1.25", "dropless")} <= routings
    assert any("sigmoid" in r["routing"] and "+shared" in r["routing"] for r in measured)
    for row in measured:
        assert _count(row["collectives"]) > 0, row
        assert _count(row["host syncs"]) >= 0, row
        size, unit = row["bytes sent"].split()
        assert unit in ("KiB", "MiB") and float(size) > 0, row
        assert float(row["vs DeepSpeed"]) > 0, row
        if row["layer"] == LAYERS[0]:
            assert float(row["vs DeepSpeed"]) == 1.0, row
    peers = [r for r in rows if r["layer"] not in LAYERS]
    assert any("Megatron-Core" in r["layer"] and "from its source" in r["layer"] for r in peers)


def test_bench_moe_hands_comm_to_the_report() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_moe.py", "--comm", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "--shapes" in proc.stdout and "Communication report" in proc.stdout
