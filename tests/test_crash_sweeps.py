"""Kills at every kind of moment of a save with its rotation, an export, ``import-hf``, ``export-hf``
and ``migrate``: whatever moment the process dies, no finished checkpoint or output is lost, nothing
half-written is taken for a result, and running the same command again completes it.

Kill points are drawn over the operation's counted file-system steps (:mod:`tests.crash_points`: each
open for writing, each chunk written, each rename, remove and mkdir) plus a few at random times.
``make test`` runs a sample of each sweep; ``make test-slow`` the full sweeps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from launch.checkpoint_tool import main as tool
from moe_parallel.checkpoints.store import STAGING_MARK, list_checkpoints, select_resume, verify_checkpoint
from tests import crash_points
from tests.fault_ops import exported_state

SAMPLE, FULL = 2, 24
SWEEPS = [pytest.param(SAMPLE, id="sample"), pytest.param(FULL, id="full", marks=pytest.mark.slow)]


def _leftovers(directory: Path) -> list[str]:
    """Staging entries anywhere under (or beside) ``directory``."""
    root = directory.parent if directory.parent.exists() else directory
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"*{STAGING_MARK}*"))


# ---------------------------------------------------------------- save and rotation


@pytest.mark.parametrize("n", SWEEPS)
def test_a_kill_during_save_or_rotation_loses_no_checkpoint(tmp_path, n):
    target = "tests.fault_ops:save_and_rotate"
    points = crash_points.sweep(target, [str(tmp_path / "count"), 3], n, seed=n)
    for i, (kill_at, delay) in enumerate(points):
        ckpts = tmp_path / f"run{i}" / "checkpoints"
        outcome = crash_points.run(target, str(ckpts), 3, kill_at=kill_at, delay_s=delay)
        where = f"kill at step {kill_at}" if kill_at else f"kill after {delay:.2f}s"
        found = list_checkpoints(ckpts)
        steps = {c.step for c in found}
        assert all(c.complete for c in found), f"{where}: {[c.describe() for c in found]}"
        assert 2 in steps, f"{where}: step 2, the newest finished checkpoint before the save, is gone ({steps})"
        assert steps <= {1, 2, 3}, where
        choice = select_resume(ckpts, "auto")
        assert choice.step == max(steps), where
        for c in found:
            assert verify_checkpoint(c.path)[1] == [], where
        # What start-up (holding the run directory) clears; then the folder verifies clean.
        from moe_parallel.checkpoints.store import clear_interrupted

        clear_interrupted(ckpts)
        assert _leftovers(ckpts) == [], where
        assert tool(["verify", str(ckpts), "--all"]) == 0, where
        if not outcome.killed:
            assert steps == {2, 3}, where


# ---------------------------------------------------------------- export / import


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """Two weights-only checkpoints ("a", "b") of one model, 64 MiB each: big enough that a write is a
    window a timed kill lands in."""
    from moe_parallel.checkpoints.checkpoint import import_consolidated

    path = tmp_path_factory.mktemp("two") / "checkpoints"
    experts = {"1": {"w1": "layer.experts.w1"}}
    for seed, tag in enumerate("ab"):
        gen = torch.Generator().manual_seed(seed)
        state = {f"dense.{i}": torch.randn(1 << 20, generator=gen) for i in range(12)}
        state["layer.experts.w1"] = torch.randn(4, 1 << 20, generator=gen)
        import_consolidated(state, experts, path, tag)
    return path


@pytest.mark.parametrize("n", SWEEPS)
def test_a_kill_during_export_keeps_the_earlier_export(tmp_path, two_checkpoints, n):
    reference = tmp_path / "reference"
    reference.mkdir()
    for tag in "ab":
        assert tool(["export", str(two_checkpoints), "--tag", tag, "--out", str(reference / f"{tag}.pt")]) == 0
    old, new = (exported_state(reference / f"{tag}.pt") for tag in "ab")
    target = "tests.fault_ops:tool"

    def args(out: Path) -> list[str]:
        return ["export", str(two_checkpoints), "--tag", "b", "--out", str(out)]

    count_dir = tmp_path / "count"
    count_dir.mkdir()
    points = crash_points.sweep(target, args(count_dir / "model.pt"), n, seed=n)
    for i, (kill_at, delay) in enumerate(points):
        folder = tmp_path / f"export{i}"
        folder.mkdir()
        out = folder / "model.pt"
        for suffix in ("", ".json"):  # the earlier export, of "a"
            shutil.copy(reference / f"a.pt{suffix}", folder / f"model.pt{suffix}")
        crash_points.run(target, *args(out), kill_at=kill_at, delay_s=delay)
        where = f"kill at step {kill_at}" if kill_at else f"kill after {delay:.3f}s"
        state = exported_state(out)  # always a whole file: the earlier one or the new one
        assert _same(state, old) or _same(state, new), where
        code = tool(["import", str(out), "--out", str(folder / "imported")])
        meta = json.loads((folder / "model.pt.json").read_text())
        if code != 0:  # killed between the two renames: the pair is told apart, not imported
            assert _same(state, new) and meta["source"].endswith("/a"), where
        # The same command again completes it, and leaves nothing behind.
        assert tool(args(out)) == 0, where
        assert _same(exported_state(out), new) and _leftovers(folder) == [], where
        assert tool(["import", str(out), "--out", str(folder / "again")]) == 0, where


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_import_of_a_damaged_or_mismatched_export_exits_2_naming_the_file(tmp_path, two_checkpoints, capsys):
    out = tmp_path / "model.pt"
    assert tool(["export", str(two_checkpoints), "--tag", "a", "--out", str(out)]) == 0
    data = out.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        out.write_bytes(data[:cut])
        capsys.readouterr()
        assert tool(["import", str(out), "--out", str(tmp_path / f"i{cut}")]) == 2
        assert str(out) in capsys.readouterr().err
    out.write_bytes(data)
    (tmp_path / "model.pt.json").write_text("{not json")
    assert tool(["import", str(out), "--out", str(tmp_path / "j")]) == 2
    assert "model.pt.json is damaged" in capsys.readouterr().err


# ---------------------------------------------------------------- Hugging Face conversion


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> Path:
    from tests.hf_app_fixtures import tiny_family_model

    src = tmp_path_factory.mktemp("hf") / "qwen"
    tiny_family_model("qwen3_moe", src, vocab_size=64, seed=3)
    return src


@pytest.mark.parametrize("n", SWEEPS)
def test_a_kill_during_import_hf_leaves_nothing_and_a_rerun_completes(tmp_path, hf_source, n):
    from tests.hf_models import assert_same_tensors

    target = "tests.fault_ops:tool"
    argv = ["import-hf", str(hf_source), "--out", str(tmp_path / "count" / "ckpt")]
    points = crash_points.sweep(target, argv, n, seed=n)
    for i, (kill_at, delay) in enumerate(points):
        out = tmp_path / f"import{i}" / "ckpt"
        argv = ["import-hf", str(hf_source), "--out", str(out)]
        outcome = crash_points.run(target, *argv, kill_at=kill_at, delay_s=delay)
        where = f"kill at step {kill_at}" if kill_at else f"kill after {delay:.2f}s"
        if out.exists():  # renamed into place: complete
            assert tool(["verify", str(out)]) == 0 and (out / "hf_model" / "config.json").is_file(), where
        else:
            assert outcome.killed, where
            assert tool(["import-hf", str(hf_source), "--out", str(out)]) == 0, where
        assert _leftovers(out) == [], where
        assert tool(["export-hf", str(out), "--out", str(out.parent / "hf")]) == 0, where
        assert_same_tensors(hf_source, out.parent / "hf")


@pytest.mark.parametrize("n", SWEEPS)
def test_a_kill_during_export_hf_leaves_nothing_and_a_rerun_completes(tmp_path, hf_source, n):
    from tests.hf_models import assert_same_tensors

    ckpt = tmp_path / "ckpt"
    assert tool(["import-hf", str(hf_source), "--out", str(ckpt)]) == 0
    target = "tests.fault_ops:tool"
    points = crash_points.sweep(target, ["export-hf", str(ckpt), "--out", str(tmp_path / "count")], n, seed=n)
    for i, (kill_at, delay) in enumerate(points):
        out = tmp_path / f"export{i}" / "hf"
        outcome = crash_points.run(target, "export-hf", str(ckpt), "--out", str(out), kill_at=kill_at, delay_s=delay)
        where = f"kill at step {kill_at}" if kill_at else f"kill after {delay:.2f}s"
        if not out.exists():
            assert outcome.killed, where
            assert tool(["export-hf", str(ckpt), "--out", str(out)]) == 0, where
        assert_same_tensors(hf_source, out)  # complete, whichever run wrote it
        assert _leftovers(out) == [], where
