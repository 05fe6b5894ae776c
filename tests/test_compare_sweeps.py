"""benchmarks/compare_sweeps.py: the per-point change of DeepSpeed / ours and its median's interval."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _sweep(path: Path, ratios: dict[str, float | None], failed: set[str] = frozenset()) -> Path:
    points = [
        {"config": {"name": k}, "label": f"T=64 ({k})", "ratios": {"deepspeed/ours": v}, "failed": k in failed}
        for k, v in ratios.items()
    ]
    path.write_text(json.dumps({"points": points}))
    return path


@pytest.mark.parametrize("seed", range(3))
def test_the_median_change_and_its_bound_come_from_the_shared_points(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    labels = [f"s{i:02d}" for i in range(rng.randint(9, 30))]
    before = {label: rng.uniform(0.8, 1.8) for label in labels}
    change = {label: rng.uniform(0.9, 1.1) for label in labels}
    after = {label: before[label] * change[label] for label in labels}
    after["only-after"], before["only-before"] = 1.0, 1.0
    proc = subprocess.run(
        [sys.executable, "benchmarks/compare_sweeps.py", str(_sweep(tmp_path / "b.json", before)),
         str(_sweep(tmp_path / "a.json", after, failed={"s00"})), "--min-low", "0.0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shared = [label for label in labels if label != "s00"]  # a failed point is left out
    want = statistics.median(change[label] for label in shared)
    summary = proc.stdout.strip().splitlines()[-1]
    assert f"median over {len(shared)} points: {want:.3f}" in summary, summary
    low = float(summary.split("(CI ")[1].split("-")[0])
    assert low <= want and low >= min(change[label] for label in shared) - 1e-3
    assert "only-after" not in proc.stdout and "only-before" not in proc.stdout


def test_a_lower_bound_below_the_threshold_fails(tmp_path: Path) -> None:
    before = _sweep(tmp_path / "b.json", {f"s{i}": 1.2 for i in range(12)})
    after = _sweep(tmp_path / "a.json", {f"s{i}": 1.0 for i in range(12)})
    proc = subprocess.run(
        [sys.executable, "benchmarks/compare_sweeps.py", str(before), str(after), "--min-low", "0.97"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "regression" in proc.stderr, proc.stderr
