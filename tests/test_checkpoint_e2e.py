"""Checkpoint faults as a user meets them: `python launch/train.py` on a real run directory.

One tiny single-process run (steps 2 and 4 checkpointed) is copied for each case, damaged the way
the case says, and trained on again. Refusals must leave the run directory exactly as it was.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from launch.checkpoint_tool import main as checkpoint_tool
from tests.app_cli import REPO, snapshot, tiny_overrides, train_command

TINY = [
    "+experiment=cpu_demo",
    "parallel.ep=1",
    *tiny_overrides(layers=1, corpus_bytes=200_000, micro_batch=2, log_every=2, eval_every=2),
    "train.ckpt_every=2",
    "logger.mode=disabled",
]


def train(run_dir: Path, cache: Path, *overrides: str, keep: int = 1) -> subprocess.CompletedProcess:
    cmd = [*train_command(), *TINY, f"data.cache_dir={cache}", f"train.run_dir={run_dir}"]
    cmd += [f"train.keep_checkpoints={keep}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def refused(proc: subprocess.CompletedProcess) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    return " ".join(output.split())  # messages may wrap


@pytest.fixture(scope="module")
def base(tmp_path_factory, app_cache):
    run = tmp_path_factory.mktemp("ckpt_e2e") / "base"
    ok(train(run, app_cache, "train.steps=4", keep=2))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000004"]
    return run, app_cache


@pytest.fixture
def run(base, tmp_path):
    """A copy of the base run to damage."""
    source, cache = base
    copy = tmp_path / "run"
    shutil.copytree(source, copy)
    return copy, cache


def test_missing_latest_resumes_from_the_newest_complete_checkpoint(run):
    run_dir, cache = run
    (run_dir / "checkpoints" / "latest").unlink()  # a crash between the save and the pointer update
    out = ok(train(run_dir, cache, "train.steps=6"))
    ckpts = run_dir / "checkpoints"
    assert f"resumed from {ckpts / 'step_00000004'} at step 4" in out and "latest is missing" in out
    # keep_checkpoints=1, yet step 4 stays: it is the newest checkpoint known to have trained cleanly.
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004", "step_00000006"]


def test_a_resume_path_with_a_typo_is_refused(run):
    run_dir, cache = run
    before = snapshot(run_dir)
    typo = run_dir / "checkpoints" / "step_0000004"
    msg = refused(train(run_dir, cache, "train.steps=6", f"train.resume={typo}"))
    assert f"{typo} does not exist" in msg
    assert f"newest complete checkpoint is {run_dir / 'checkpoints' / 'step_00000004'}" in msg
    assert snapshot(run_dir) == before


def test_a_checkpoint_corrupted_in_place_is_refused_naming_the_file(run):
    run_dir, cache = run
    dense = run_dir / "checkpoints" / "step_00000004" / "dense" / "stage_0.pt"
    data = bytearray(dense.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])  # same size
    dense.write_bytes(bytes(data))
    before = snapshot(run_dir)
    msg = refused(train(run_dir, cache, "train.steps=6"))
    assert f"checkpoint file {dense} is corrupt" in msg
    assert f"newest earlier complete checkpoint is {run_dir / 'checkpoints' / 'step_00000002'}" in msg
    assert snapshot(run_dir) == before  # config.yaml, summary.json and every checkpoint as they were
    assert checkpoint_tool(["verify", str(run_dir / "checkpoints")]) == 2
    out = run_dir.parent / "model.pt"
    assert checkpoint_tool(["export", str(run_dir / "checkpoints"), "--out", str(out)]) == 2 and not out.exists()


def test_a_truncated_manifest_is_named_with_the_checkpoint_that_would_load(run):
    run_dir, cache = run
    manifest = run_dir / "checkpoints" / "step_00000004" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    before = snapshot(run_dir)
    msg = refused(train(run_dir, cache, "train.steps=6"))
    assert f"{manifest} is not valid JSON" in msg and "JSONDecodeError" not in msg
    assert f"resuming from {run_dir / 'checkpoints' / 'step_00000002'} (step 2) would overwrite" in msg
    assert snapshot(run_dir) == before
    assert checkpoint_tool(["verify", str(run_dir / "checkpoints")]) == 2


def test_train_steps_below_the_checkpoint_step_is_refused_and_changes_nothing(run):
    run_dir, cache = run
    before = snapshot(run_dir)
    msg = refused(train(run_dir, cache, "train.steps=3"))
    assert "train.steps=3 is below the step of the checkpoint this run resumes from (4," in msg
    assert snapshot(run_dir) == before
    # At the checkpoint's step exactly there is nothing to train, and nothing changes either.
    out = ok(train(run_dir, cache, "train.steps=4"))
    assert "nothing to train" in out
    assert snapshot(run_dir) == before


def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(base, small_tmpfs):
    source, cache = base
    run_dir = small_tmpfs / "run"
    shutil.copytree(source, run_dir)
    ckpts = run_dir / "checkpoints"
    one = sum(f.stat().st_size for f in (ckpts / "step_00000004").rglob("*") if f.is_file())
    free = shutil.disk_usage(small_tmpfs).free
    assert free > one, "the tmpfs is too small for this model's checkpoint"
    with open(small_tmpfs / "filler", "wb") as filler:
        filler.write(b"\0" * (free - one // 3))
    msg = refused(train(run_dir, cache, "train.steps=6"))
    assert f"no space left on {ckpts}" in msg and "unexpected pos" not in msg
    assert f"{ckpts / 'step_00000004'} is unchanged and still the latest checkpoint" in msg
    assert not list(ckpts.glob("*.tmp-*"))  # the staging directory is removed
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert checkpoint_tool(["verify", str(ckpts)]) == 0


@pytest.mark.parametrize("rel", ["trainer.pt", pytest.param("rng/rank_0.pt", marks=pytest.mark.slow)])
def test_a_checkpoint_file_that_would_run_a_command_is_refused_and_runs_nothing(run, rel):
    """The attack as it would come: a file replaced by a pickle that runs a shell command, its size
    and checksum recorded anew in the manifest; the next resume (plain auto-resume, a Slurm requeue)."""
    from tests.test_checkpoint_security import _payloads, tamper

    run_dir, cache = run
    marker = run_dir.parent / "pwned"
    step = run_dir / "checkpoints" / "step_00000004"
    tamper(step, rel, _payloads(marker)["zip"])
    before = snapshot(run_dir)
    msg = refused(train(run_dir, cache, "train.steps=6"))
    assert f"{step / rel} holds objects other than tensors and plain data (asks for posix.system)" in msg
    assert "restore the checkpoint from a copy you trust" in msg
    assert not marker.exists() and snapshot(run_dir) == before
    assert checkpoint_tool(["verify", str(run_dir / "checkpoints"), "--all"]) == 2
    assert not marker.exists()


def test_a_run_of_an_earlier_format_is_refused_then_resumes_after_migrate(run):
    from tests.test_checkpoint_security import to_format_2

    run_dir, cache = run
    ckpts = run_dir / "checkpoints"
    for step in ("step_00000002", "step_00000004"):
        to_format_2(ckpts / step)
    msg = refused(train(run_dir, cache, "train.steps=6"))
    assert f"convert it once with `python -m launch.checkpoint_tool migrate --trust {ckpts}`" in msg
    assert checkpoint_tool(["migrate", str(ckpts), "--trust"]) == 0
    out = ok(train(run_dir, cache, "train.steps=6"))
    assert f"resumed from {ckpts / 'step_00000004'} at step 4" in out


def test_with_a_signing_key_a_run_resumes_only_checkpoints_signed_with_it(run, monkeypatch):
    from moe_parallel.checkpoints.store import SIGNING_KEY_ENV

    run_dir, cache = run
    monkeypatch.setenv(SIGNING_KEY_ENV, "the team's secret")
    before = snapshot(run_dir)
    msg = refused(train(run_dir, cache, "train.steps=6"))  # its checkpoints were written without the key
    assert f"is not signed with the key in {SIGNING_KEY_ENV}" in msg and snapshot(run_dir) == before
    signed = run_dir.parent / "signed"
    ok(train(signed, cache, "train.steps=2"))
    assert f"resumed from {signed / 'checkpoints' / 'step_00000002'}" in ok(train(signed, cache, "train.steps=4"))


def test_start_up_clears_what_killed_saves_and_rotations_left(run):
    run_dir, cache = run
    ckpts = run_dir / "checkpoints"
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000006.tmp-0badc0de")  # a save cut short
    half = ckpts / "step_00000002.tmp-deleted-0badc0de"  # a rotation cut short mid-delete
    shutil.copytree(ckpts / "step_00000002", half)
    (half / "manifest.json").unlink()
    out = ok(train(run_dir, cache, "train.steps=6"))
    assert f"removed {ckpts / 'step_00000006.tmp-0badc0de'}" in out and f"removed {half}" in out
    assert not list(ckpts.glob("*.tmp-*"))
    assert checkpoint_tool(["verify", str(ckpts), "--all"]) == 0
