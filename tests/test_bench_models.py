"""``make bench-models``'s pieces that need no AutoEP run: the statistics, the profiler breakdown, the
options; and, where ``.venv-autoep`` exists, that it holds the versions AutoEP runs with.

The benchmark itself (minutes of start-up and compilation on a small machine) is never run here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = REPO / ".venv-autoep" / "bin" / "python"
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_models  # noqa: E402
import models_side  # noqa: E402

from benchmarks.harness.rounds import median_ci  # noqa: E402


def test_order_statistic_interval_for_the_median() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert median_ci(values) == (1.0, 5.0, 1 - 2 / 32)  # [min, max]: 93.75% at n=5
    low, high, cov = median_ci([float(x) for x in range(10)])
    assert (low, high) == (1.0, 8.0) and cov == pytest.approx(1 - 2 * 11 / 1024)  # x(2), x(9)
    assert median_ci([2.0])[2] == 0.0


def test_rows_pair_rounds_and_compare_first_losses() -> None:
    row = bench_models.Row(
        "mixtral", 2, "eager", {"ours": [10.0, 20.0], "autoep": [15.0, 20.0]}, {"ours": 2.0, "autoep": 2.0002}, {}
    )
    assert row.ratios == [1.5, 1.0] and row.loss_rel == pytest.approx(1e-4)
    times = [{"seconds": [1.0, 4.0]}, {"seconds": [2.0, 3.0]}]
    assert bench_models.per_step(times, "seconds", max) == [2.0, 4.0]  # the slowest rank per step


def test_quick_mode_is_one_family_both_ep_sizes_eager() -> None:
    args = bench_models.parse_args(["--quick"])
    assert (args.families, args.ep, args.modes) == (["mixtral"], [1, 2], ["eager"])
    with pytest.raises(SystemExit):
        bench_models.parse_args(["--families", "gpt2"])


def test_backward_ops_take_the_category_of_their_forward_module() -> None:
    model = torch.nn.ModuleDict({"attn": torch.nn.Linear(32, 32), "experts": torch.nn.Linear(32, 32)})
    handles = models_side._hook_scopes(model, {r"^attn$": "attention", r"^experts$": "experts"})
    x = torch.randn(64, 32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("bench::forward"):
            loss = model["experts"](model["attn"](x).relu()).square().mean()
        with torch.profiler.record_function("bench::backward"):
            loss.backward()
    for handle in handles:
        handle.remove()
    totals, ops = models_side.breakdown(prof.events())
    for category in ("attention", "experts"):
        assert totals[category] > 0
        assert any("AddmmBackward0" in name for name in ops[category]), ops[category]  # its backward too
    assert any("MeanBackward" in name for name in ops["other layers"])  # the loss: no module scope


def test_collectives_count_whole_and_by_kind() -> None:
    def event(name: str, parent=None, seq: int = -1):
        return SimpleNamespace(name=name, cpu_parent=parent, sequence_nr=seq)

    scope = event("bench::dispatch/combine")
    a2a = event("c10d::alltoall_base_", scope)
    assert models_side._category(event("aten::empty", a2a), {}) == "all-to-all"
    assert models_side._category(event("_AllToAllBackward", event(models_side.EVALUATE, seq=7)), {}) == "all-to-all"
    assert models_side._category(event("c10d::allreduce_", event("bench::optimizer")), {}) == "grad collectives"
    assert models_side._category(event("aten::broadcast_tensors", scope), {}) == "dispatch/combine"
    grad = event("aten::mm", event(models_side.EVALUATE, seq=7))
    assert models_side._category(grad, {7: "experts"}) == "experts"


@pytest.mark.skipif(not PEER_PYTHON.exists(), reason="no .venv-autoep (make bench-models builds it)")
def test_peer_venv_holds_the_versions_autoep_runs_with() -> None:
    code = "import importlib.metadata as m; print(*(m.version(p) for p in ('deepspeed', 'transformers', 'torch')))"
    out = subprocess.run([str(PEER_PYTHON), "-c", code], capture_output=True, text=True, timeout=60, check=True)
    deepspeed, transformers, torch_version = out.stdout.split()
    assert deepspeed == "0.19.8" and transformers.startswith("5.15.") and torch_version.startswith("2.13.0")
