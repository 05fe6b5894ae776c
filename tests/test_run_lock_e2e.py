"""One job at a time per run directory, as a user meets it: real `launch/train.py` jobs on one directory.

Jobs started together or one after another: exactly one trains, the others stop at once with exit
status 1, naming the run directory and the job that holds it, and change nothing in it. When the
holder ends (cleanly, or SIGKILLed), the next job takes the directory over without help.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from tests.app_cli import metric_rows, snapshot, tiny_overrides, tokenized_cache, train_command
from tests.app_job import AppJob

TINY = [*tiny_overrides(layers=1, corpus_bytes=200_000, micro_batch=2), "logger=disabled"]


@pytest.fixture(scope="module")
def cache(app_cache) -> Path:
    """The corpus tokenized before the first job (tokenizing would dominate its start)."""
    return tokenized_cache(app_cache, 200_000, 16)


class Job(AppJob):
    """`python launch/train.py ...` (or `deepspeed --num_gpus 2 ...`) with its output collected as it comes."""

    def __init__(self, run_dir: Path, cache: Path, *extra: str, ranks: int = 1) -> None:
        args = [*TINY, f"data.cache_dir={cache}", f"train.run_dir={run_dir}", *extra]
        super().__init__([*train_command(ranks), *(["parallel.ep=2"] if ranks > 1 else []), *args])


def logged_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in metric_rows(run_dir) if "train/loss" in row]


def assert_refused(job: Job, run_dir: Path, holder_pid: int) -> None:
    """Exit status 1 with one clean message naming the directory and the holder; no step trained."""
    out = job.output
    assert job.proc.returncode == 1, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors, out[-4000:]
    message = errors[0]
    assert f"run directory {run_dir} " in message and f"pid {holder_pid} " in message, message
    assert socket.gethostname() in message and "checkpoint_tool lock" in message, message
    assert "| loss " not in out  # no training step


def run_together(run_dir: Path, cache: Path, count: int, steps: int) -> list[Job]:
    """``count`` jobs started at the same moment; each with its own seed, so config.yaml names the one that trained."""
    jobs = [Job(run_dir, cache, f"train.steps={steps}", "train.ckpt_every=2", f"train.seed={i}") for i in range(count)]
    try:
        for job in jobs:
            job.wait()
    finally:
        for job in jobs:
            job.kill()
    return jobs


def assert_one_trained(jobs: list[Job], run_dir: Path, steps: int) -> None:
    codes = [job.proc.returncode for job in jobs]
    assert sorted(codes) == [0] + [1] * (len(jobs) - 1), [(c, j.output[-2000:]) for c, j in zip(codes, jobs)]
    winner = jobs[codes.index(0)]
    for job in jobs:
        if job is not winner:
            assert_refused(job, run_dir, winner.proc.pid)
    # Only the winner wrote: each step logged once, its config, its checkpoints; the lock is gone.
    assert logged_steps(run_dir) == list(range(1, steps + 1))
    assert f"seed: {jobs.index(winner)}\n" in (run_dir / "config.yaml").read_text()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", f"step_{steps - 2:08d}",
                                                                           f"step_{steps:08d}"]  # fmt: skip
    assert not (run_dir / "run.lock").exists()


def test_two_jobs_started_together_one_trains_the_other_stops(tmp_path, cache):
    run = tmp_path / "run"
    jobs = run_together(run, cache, 2, steps=4)
    assert_one_trained(jobs, run, steps=4)
    winner, loser = sorted(jobs, key=lambda j: j.proc.returncode)
    assert loser.seconds < winner.seconds  # it did not wait for the holder


def test_a_job_beside_a_live_one_changes_nothing_and_the_next_takes_over_after_sigkill(tmp_path, cache):
    run = tmp_path / "run"
    holder = Job(run, cache, "train.steps=100000", "train.ckpt_every=2")
    try:
        holder.wait_for("step     3/")
        os.kill(holder.proc.pid, signal.SIGSTOP)  # alive, holds the lock, writes nothing while we look
        before = snapshot(run)
        # A second job of two ranks: every rank stops at once with the message, none waits in a collective.
        second = Job(run, cache, "train.steps=100000", ranks=2)
        try:
            assert second.wait(timeout=120) == 1, second.output[-4000:]
        finally:
            second.kill()
        assert_refused(second, run, holder.proc.pid)
        assert snapshot(run) == before  # metrics.jsonl, config.yaml, checkpoints: byte for byte
        lock = (run / "run.lock").read_text()
        assert f'"pid": {holder.proc.pid}' in lock
    finally:
        holder.kill()  # SIGKILL: no chance to release; the lock file stays behind
    assert (run / "run.lock").exists()
    third = Job(run, cache, "train.steps=100000", "train.exit_after_steps=2", "train.ckpt_every=2")
    assert third.wait() == 0, third.output[-4000:]
    out = third.output
    assert f"pid {holder.proc.pid} " in out and "no longer runs" in out, out[-3000:]  # says whose lock it took over
    assert "resumed from" in out
    assert not (run / "run.lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 3, 3, 4])
def test_many_jobs_started_together_exactly_one_trains(tmp_path, cache, count):
    run = tmp_path / "run"
    jobs = run_together(run, cache, count, steps=4)
    assert_one_trained(jobs, run, steps=4)


@pytest.mark.slow
def test_staggered_jobs_each_refused_then_one_takes_over_after_a_clean_end(tmp_path, cache):
    run = tmp_path / "run"
    holder = Job(run, cache, "train.steps=12", "train.ckpt_every=2")
    refused = []
    try:
        holder.wait_for("step     2/")
        os.kill(holder.proc.pid, signal.SIGSTOP)  # still holding while the others start, one after another
        for _ in range(3):
            job = Job(run, cache, "train.steps=12")
            try:
                job.wait(timeout=120)
            finally:
                job.kill()
            refused.append(job)
        os.kill(holder.proc.pid, signal.SIGCONT)
        assert holder.wait() == 0, holder.output[-3000:]
    finally:
        holder.kill()
    for job in refused:
        assert_refused(job, run, holder.proc.pid)
    assert logged_steps(run) == list(range(1, 13))
    after = Job(run, cache, "train.steps=14")
    assert after.wait() == 0, after.output[-3000:]
    assert "resumed from" in after.output and "took over" not in after.output  # released cleanly: nothing to take over
    assert logged_steps(run) == list(range(1, 15))
    assert not (run / "run.lock").exists()


def test_a_chosen_checkpoint_that_vanishes_before_loading_is_a_checkpoint_error(tmp_path):
    """The checkpoint choose_resume picked is rotated away (by another job) before restore() loads it."""
    import shutil
    from types import SimpleNamespace

    import torch

    from launch.loop import Trainer
    from moe_parallel.checkpoints.checkpoint import CheckpointError, ResumeChoice

    chosen = tmp_path / "checkpoints" / "step_00000004"
    chosen.mkdir(parents=True)
    (chosen / "manifest.json").write_text("{}")
    shutil.rmtree(chosen)  # rotated away between the choice and the load
    trainer = Trainer.__new__(Trainer)
    trainer.engine = SimpleNamespace(module=torch.nn.Linear(2, 2), global_steps=0)
    trainer.resume_from = ResumeChoice(path=chosen, step=4, reason="the newest complete checkpoint")
    trainer.run_dir = tmp_path
    with pytest.raises(CheckpointError, match=f"{chosen}.*(vanished|does not exist|gone)"):
        trainer.restore()
