"""The run directory's lock under a real Slurm controller (tests/slurm_cluster.py, marker ``slurm``).

A job that holds a run directory and is requeued the hard way (its processes killed, the lock left
behind) takes its own lock over when it restarts: same job id, higher restart count. Another job's
lock is judged by what ``scontrol show job`` reports: running, ended, or unknown to the controller.
No training here: a few lines of Python hold the lock, so this costs seconds, not minutes.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from launch.lock_holder import ALIVE, GONE, Holder, SlurmQuery, judge
from launch.run_lock import read_holder

if TYPE_CHECKING:
    from tests.slurm_cluster import SlurmCluster

pytest_plugins = ["tests.slurm_cluster"]
pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parent.parent

HOLD = """\
import os, sys, time
from launch.run_lock import RunLock
lock = RunLock(sys.argv[1], "training").acquire()
gone = lock.took_over
print("held, restart", os.environ.get("SLURM_RESTART_COUNT", "0"), "took over:",
      gone.verdict.reason if gone else "nothing", flush=True)
time.sleep(600)
"""


def holder_job(cluster: SlurmCluster, tmp: Path, run_dir: Path) -> tuple[int, Path]:
    script = tmp / "hold.sbatch"
    script.write_text(f"#!/bin/bash\ncd {REPO}\nexec {sys.executable} -c '{HOLD}' {run_dir}\n")
    log = tmp / "hold-%j.out"
    job = cluster.sbatch(
        script, sbatch_args=["--requeue", "--nodes=1", "--ntasks=1", f"--output={log}", "--open-mode=append"]
    )
    return job, Path(str(log).replace("%j", str(job)))


def wait_for_line(cluster: SlurmCluster, job: int, log: Path, text: str, timeout: float = 60) -> str:
    cluster.wait_job(job, lambda i: log.exists() and text in log.read_text(), timeout, what=f"logging {text!r}")
    return log.read_text()


def test_a_requeued_job_takes_over_its_own_lock_and_scontrol_judges_other_jobs(
    slurm_cluster: SlurmCluster, tmp_path, monkeypatch
):
    cluster = slurm_cluster
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))  # the scontrol this test's judge() runs
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job, log = holder_job(cluster, tmp_path, run_dir)
    try:
        wait_for_line(cluster, job, log, "held, restart 0 took over: nothing")
        first = read_holder(run_dir)
        assert first.slurm_job_id == str(job) and first.slurm_restart_count == 0 and first.slurm_cluster
        # Seen from outside the job, as from another host: Slurm says the job runs.
        elsewhere = dataclasses.replace(first, host="gpu77", boot_id="another-boot")
        here = Holder.current("inspect")
        assert judge(elsewhere, here, slurm=SlurmQuery()).state == ALIVE

        # Requeued the hard way: Slurm kills the holder (SIGTERM, no handler), the lock stays behind.
        cluster.command("scontrol", "requeue", str(job))
        cluster.release_requeued(job)
        out = wait_for_line(cluster, job, log, "held, restart 1")
        assert f"took over: it was restart 0 of Slurm job {job}, which runs as restart 1 now" in out, out
        assert read_holder(run_dir).slurm_restart_count == 1
    finally:
        cluster.command("scancel", str(job), check=False)
    cluster.wait_finished(job, timeout=60, restarts=1)
    ended = judge(elsewhere, here, slurm=SlurmQuery())
    assert ended.state == GONE and f"Slurm reports job {job} CANCELLED" in ended.reason, ended
    purged = dataclasses.replace(elsewhere, slurm_job_id="987654")  # a job the controller does not know
    unknown = judge(purged, here, slurm=SlurmQuery())
    assert unknown.state == GONE and "unknown to the controller" in unknown.reason, unknown
    other_cluster = dataclasses.replace(purged, slurm_cluster="elsewhere")
    assert judge(other_cluster, here, slurm=SlurmQuery()).state != GONE
