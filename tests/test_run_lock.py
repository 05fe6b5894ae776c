"""The run directory's lock (launch/run_lock.py): staleness rules, races between jobs, `checkpoint_tool lock`.

The rules are checked on fake holders (a dead pid, a reused pid, another boot, a requeued Slurm job,
another host); the races on real processes started together: of N jobs exactly one holds the
directory, also when several of them find the same stale lock and break it at once.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import lock_holder, run_lock
from launch.lock_holder import ALIVE, GONE, UNKNOWN, Holder, ProcessInfo, judge, process_info
from launch.run_lock import RunDirLocked, RunLock, RunLockError, break_lock, inspect, read_holder

REPO = Path(__file__).resolve().parent.parent
FORK = multiprocessing.get_context("fork")


def dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_record(directory: Path, holder: Holder, name: str = run_lock.LOCK_FILE) -> None:
    (directory / name).write_text(holder.to_json())


def stale_holder(**changes) -> Holder:
    """A holder on this host whose process has ended (SIGKILLed without releasing)."""
    return dataclasses.replace(Holder.current("training"), pid=dead_pid(), start_ticks=12345, flock=True, **changes)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("run.lock."))


class FakeSlurm(lock_holder.SlurmQuery):
    def __init__(self, state: str | None, cluster: str | None = "c1") -> None:
        super().__init__()
        self.state, self._cluster_name, self.asked = state, cluster, []

    def job_state(self, job_id: str) -> str | None:
        self.asked.append(job_id)
        return self.state

    def cluster(self) -> str | None:
        return self._cluster_name


# ---------------------------------------------------------------- staleness rules


@pytest.fixture
def here() -> Holder:
    return Holder.current("training")


def verdict(holder: Holder, here: Holder, **kwargs):
    kwargs.setdefault("process", lambda pid: ProcessInfo(holder.start_ticks, False))
    kwargs.setdefault("slurm", FakeSlurm(None))
    return judge(holder, here, **kwargs)


def test_a_pid_that_no_longer_runs_on_this_host_is_gone(here):
    holder = dataclasses.replace(here, pid=4242)
    v = verdict(holder, here, process=lambda pid: None)
    assert v.state == GONE and "pid 4242 no longer runs on this host" in v.reason
    assert verdict(holder, here, process=lambda pid: ProcessInfo(here.start_ticks, True)).state == GONE  # zombie
    assert judge(dataclasses.replace(here, pid=dead_pid()), here).state == GONE  # the real /proc


def test_a_reused_pid_is_gone_and_the_same_process_is_alive(here):
    holder = dataclasses.replace(here, pid=4242, start_ticks=1000)
    reused = verdict(holder, here, process=lambda pid: ProcessInfo(2000, False))
    assert reused.state == GONE and "reused" in reused.reason
    alive = verdict(holder, here, process=lambda pid: ProcessInfo(1000, False))
    assert alive.state == ALIVE and "pid 4242 still runs" in alive.reason
    # Another user's process whose start time /proc hides: not provably gone.
    assert verdict(holder, here, process=lambda pid: ProcessInfo(None, False)).state == UNKNOWN
    # The real /proc: this very process, and this pid with another start time.
    assert judge(here, here).state == ALIVE
    assert judge(dataclasses.replace(here, start_ticks=here.start_ticks - 1), here).state == GONE


def test_the_same_host_after_a_reboot_is_gone_another_host_is_held(here):
    rebooted = dataclasses.replace(here, boot_id="another-boot")
    v = verdict(rebooted, here)
    assert v.state == GONE and "rebooted" in v.reason
    other_host = dataclasses.replace(here, host="gpu77", boot_id="another-boot")
    v = verdict(other_host, here)
    assert v.state == UNKNOWN and "gpu77" in v.reason and "outside Slurm" in v.reason
    # "localhost" is no host name to tell machines apart by.
    anonymous = dataclasses.replace(here, host="localhost", boot_id="another-boot")
    assert verdict(anonymous, dataclasses.replace(here, host="localhost")).state == UNKNOWN


def test_an_earlier_run_of_the_same_slurm_job_is_gone(here):
    me = dataclasses.replace(here, slurm_job_id="77", slurm_restart_count=2, slurm_cluster="c1")
    before = dataclasses.replace(me, host="gpu77", boot_id="b", pid=1, slurm_restart_count=1)
    slurm = FakeSlurm("RUNNING")  # the job runs: as this very restart, not the holder's
    v = verdict(before, me, slurm=slurm)
    assert v.state == GONE and "restart 1 of Slurm job 77" in v.reason and not slurm.asked
    for same_or_later in (2, 3):  # two steps of one job instance, or a record from the future: held
        v = verdict(dataclasses.replace(before, slurm_restart_count=same_or_later), me, slurm=slurm)
        assert v.state == UNKNOWN and "same Slurm job 77" in v.reason
    other_cluster = dataclasses.replace(before, slurm_cluster="c2")
    assert verdict(other_cluster, me, slurm=FakeSlurm(None)).state == UNKNOWN


@pytest.mark.parametrize(
    "state,cluster,expected",
    [
        ("RUNNING", "c1", ALIVE),
        ("COMPLETING", "c1", ALIVE),
        ("SUSPENDED", "c1", ALIVE),
        ("COMPLETED", "c1", GONE),
        ("CANCELLED", "c1", GONE),
        ("NODE_FAIL", "c1", GONE),
        ("PENDING", "c1", GONE),  # requeued, not restarted yet: none of its processes runs
        ("UNKNOWN_JOB", "c1", GONE),  # purged by the controller after it ended
        ("UNKNOWN_JOB", "c2", UNKNOWN),  # another cluster's job number means nothing here
        ("UNKNOWN_JOB", None, UNKNOWN),
        ("COMPLETED", "c2", UNKNOWN),
        (None, "c1", UNKNOWN),  # the query failed: no proof
        ("SOMETHING_NEW", "c1", UNKNOWN),
    ],
)
def test_another_slurm_job_is_judged_by_the_controller(here, state, cluster, expected):
    holder = dataclasses.replace(here, host="gpu77", boot_id="b", slurm_job_id="55", slurm_cluster="c1")
    me = dataclasses.replace(here, slurm_job_id="56", slurm_cluster=None)  # outside a job: asks the controller
    slurm = FakeSlurm(state, cluster=cluster)
    v = verdict(holder, me, slurm=slurm)
    assert v.state == expected, v
    assert slurm.asked == ["55"]


def test_a_held_flock_proves_a_live_holder_and_a_free_one_proves_nothing_across_hosts(here):
    dead = dataclasses.replace(here, pid=4242)
    v = verdict(dead, here, process=lambda pid: None, flock_held=True)
    assert v.state == ALIVE and "flock" in v.reason
    elsewhere = dataclasses.replace(here, host="gpu77", boot_id="b")
    assert verdict(elsewhere, here, flock_held=False).state == UNKNOWN
    # On this kernel but in another PID namespace (a container): a flock nobody holds proves it gone.
    container = dataclasses.replace(here, pid_ns="pid:[1]", flock=True)
    assert verdict(container, here, flock_held=False).state == GONE
    assert verdict(container, here, flock_held=None).state == UNKNOWN
    assert verdict(dataclasses.replace(container, flock=False), here, flock_held=False).state == UNKNOWN


def test_process_info_sees_zombies_and_start_times():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        info = process_info(proc.pid)
        assert info is not None and not info.zombie and info.start_ticks > 0
        proc.kill()
        deadline = time.monotonic() + 10
        while not process_info(proc.pid).zombie:  # not reaped yet
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert process_info(proc.pid) is None


def test_a_record_round_trips_and_a_damaged_one_is_refused(here):
    assert Holder.from_json(here.to_json()) == here
    for text in ("", "{", "[]", '{"token": "x"}', '{"token": "", "pid": 1}'):
        with pytest.raises(ValueError):
            Holder.from_json(text)
    record = json.loads(here.to_json())
    for name, wrong in (("start_ticks", "123"), ("pid", True), ("flock", 1), ("slurm_restart_count", "2")):
        with pytest.raises(ValueError, match=name):
            Holder.from_json(json.dumps({**record, name: wrong}))


# ---------------------------------------------------------------- one process


def test_taking_holding_and_releasing(tmp_path):
    with RunLock(tmp_path, "training") as lock:
        held = read_holder(tmp_path)
        assert held == lock.holder and held.pid == os.getpid() and held.flock
        assert leftovers(tmp_path) == []
        with pytest.raises(RunDirLocked) as err:  # a second lock, even in this process
            RunLock(tmp_path).acquire()
        message = str(err.value)
        assert f"run directory {tmp_path} is in use" in message and f"pid {os.getpid()} " in message
        assert f"{tmp_path}/run.lock" in message and "checkpoint_tool lock" in message
        assert inspect(tmp_path).verdict.state == ALIVE
    assert not (tmp_path / "run.lock").exists() and leftovers(tmp_path) == []
    lock.release()  # twice: nothing happens
    assert inspect(tmp_path) is None


def test_a_stale_lock_is_taken_over_and_says_whose(tmp_path):
    stale = stale_holder()
    write_record(tmp_path, stale)
    with RunLock(tmp_path) as lock:
        assert lock.took_over.holder == stale and "no longer runs" in lock.took_over.verdict.reason
        assert read_holder(tmp_path) == lock.holder
    assert leftovers(tmp_path) == []


def test_a_dead_claimant_is_taken_over_too(tmp_path):
    """A job that died between claiming a stale lock and replacing it: its claim is stale in turn."""
    stale, claimant = stale_holder(), stale_holder()
    write_record(tmp_path, stale)
    write_record(tmp_path, claimant, f"{run_lock.CLAIM_PREFIX}{stale.token}")
    with RunLock(tmp_path) as lock:
        assert lock.took_over.holder == stale
    assert leftovers(tmp_path) == [] and not (tmp_path / "run.lock").exists()


def test_an_unreadable_record_counts_as_held(tmp_path):
    (tmp_path / "run.lock").write_text("")
    with pytest.raises(RunDirLocked, match="cannot be read"):
        RunLock(tmp_path).acquire()
    with pytest.raises(RunLockError, match="not provably stale"):
        break_lock(tmp_path)
    assert break_lock(tmp_path, force=True).holder is None
    assert not (tmp_path / "run.lock").exists()


def test_without_flock_the_pid_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "_try_flock", lambda fd: False)  # e.g. Lustre mounted noflock
    with RunLock(tmp_path) as lock:
        assert not read_holder(tmp_path).flock
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()} still runs on this host"):
            RunLock(tmp_path).acquire()
    assert lock.holder is not None and not (tmp_path / "run.lock").exists()


def test_a_file_system_without_hard_links_is_named(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(RunLockError, match="without hard links"):
        RunLock(tmp_path).acquire()
    assert leftovers(tmp_path) == [] and not (tmp_path / "run.lock").exists()


def test_a_link_that_succeeded_but_answered_eexist_counts(tmp_path, monkeypatch):
    """NFS: a retransmitted LINK whose first reply was lost answers EEXIST, yet the name is ours."""
    real_link = os.link

    def retransmitted(src, dst):
        real_link(src, dst)
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(os, "link", retransmitted)
    with RunLock(tmp_path) as lock:
        assert read_holder(tmp_path) == lock.holder and lock.took_over is None


def test_release_leaves_a_lock_that_is_no_longer_its_own(tmp_path, capsys):
    lock = RunLock(tmp_path).acquire()
    break_lock(tmp_path, force=True)
    with RunLock(tmp_path) as other:
        lock.release()
        assert read_holder(tmp_path) == other.holder
    assert "no longer this job's lock" in capsys.readouterr().err


# ---------------------------------------------------------------- many processes at once


def _contend(directory: str, barrier, results, release, delay: float, mode: str) -> None:
    barrier.wait()
    time.sleep(delay)
    try:
        if mode == "break":
            broken = break_lock(directory)
            results.put(("broke" if broken is not None else "absent", os.getpid(), ""))
            return
        lock = RunLock(directory).acquire()
    except RunDirLocked as err:
        results.put(("locked", os.getpid(), str(err)))
        return
    except RunLockError as err:
        results.put(("refused", os.getpid(), str(err)))
        return
    results.put(("won", os.getpid(), lock.holder.token))
    release.wait(60)
    lock.release()


def contend(directory: Path, acquirers: int, breakers: int = 0, stagger_s: float = 0.0) -> dict[str, list]:
    """Processes started together (or ``stagger_s`` apart at random); the winner holds until all have
    answered. Returns the answers by kind, after checking that exactly one acquirer holds the lock."""
    modes = ["acquire"] * acquirers + ["break"] * breakers
    random.shuffle(modes)
    barrier, results, release = FORK.Barrier(len(modes)), FORK.Queue(), FORK.Event()
    procs = [
        FORK.Process(target=_contend, args=(str(directory), barrier, results, release, random.uniform(0, stagger_s), m))
        for m in modes
    ]
    for proc in procs:
        proc.start()
    try:
        answers = [results.get(timeout=60) for _ in procs]
        by_kind: dict[str, list] = {}
        for kind, pid, detail in answers:
            by_kind.setdefault(kind, []).append((pid, detail))
        winners = by_kind.get("won", [])
        assert len(winners) == 1, answers
        (winner_pid, token), *_ = winners
        assert read_holder(directory).token == token  # the one that believes it holds it does
        for _, message in by_kind.get("locked", []):
            assert f"pid {winner_pid} " in message, message
        assert len(by_kind.get("locked", [])) == acquirers - 1, answers
    finally:
        release.set()
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    assert not (directory / "run.lock").exists() and leftovers(directory) == []
    return by_kind


@pytest.mark.parametrize("count", [2, 5, 8])
def test_of_n_jobs_started_together_exactly_one_holds(tmp_path, count):
    random.seed(count)
    for _ in range(3):
        contend(tmp_path, count)


def test_staggered_starts_one_holds(tmp_path):
    random.seed(1)
    for _ in range(3):
        contend(tmp_path, random.randint(2, 8), stagger_s=0.05)


def test_jobs_that_find_one_stale_lock_at_once_leave_one_holder(tmp_path):
    random.seed(2)
    for count in (2, 4, 8):
        write_record(tmp_path, stale_holder())
        contend(tmp_path, count)


def test_breakers_and_jobs_racing_on_one_stale_lock_leave_one_holder(tmp_path):
    random.seed(3)
    for acquirers, breakers in ((1, 3), (3, 3), (2, 6)):
        write_record(tmp_path, stale_holder())
        answers = contend(tmp_path, acquirers, breakers)
        assert len(answers.get("broke", [])) <= 1, answers  # a stale lock is removed once


@pytest.mark.slow
def test_many_draws_of_concurrent_jobs_one_holds(tmp_path):
    random.seed(4)
    for _ in range(40):
        stale = random.random() < 0.5
        if stale:
            write_record(tmp_path, stale_holder())
        contend(tmp_path, random.randint(2, 8), breakers=random.randint(0, 3) if stale else 0,
                stagger_s=random.choice([0.0, 0.01, 0.05]))  # fmt: skip


# ---------------------------------------------------------------- checkpoint_tool lock


@pytest.fixture
def tool(capsys):
    """``checkpoint_tool lock ARGS`` in this process: (exit status, stdout, stderr)."""
    from launch.checkpoint_tool import main

    def run(*args: str) -> subprocess.CompletedProcess:
        code = main(["lock", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def hold_in_child(directory: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from launch.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(300)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_checkpoint_tool_lock_shows_breaks_and_forces(tmp_path, tool):
    free = tool(str(tmp_path))
    assert free.returncode == 0 and f"{tmp_path}: not locked" in free.stdout
    holder = hold_in_child(tmp_path)
    try:
        shown = tool(str(tmp_path))
        assert shown.returncode == 0, shown.stderr
        assert f"held by the training job (pid {holder.pid} on host " in shown.stdout
        assert f"alive: pid {holder.pid} still runs on this host" in shown.stdout
        refused = tool(str(tmp_path), "--break")
        assert refused.returncode == 2 and "error: " in refused.stderr and "not provably stale" in refused.stderr
        assert (tmp_path / "run.lock").exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        stale = tool(str(tmp_path / "run.lock"))
        assert f"stale: pid {holder.pid} no longer runs on this host (--break removes the lock)" in stale.stdout
        broken = tool(str(tmp_path), "--break")
        assert broken.returncode == 0 and f"removed {tmp_path}/run.lock" in broken.stdout, broken.stderr
        assert not (tmp_path / "run.lock").exists() and leftovers(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()
    other = dataclasses.replace(stale_holder(), host="gpu77", boot_id="b")
    write_record(tmp_path, other)
    unknown = tool(str(tmp_path))
    assert "unknown: it cannot be proven gone: it ran on host gpu77" in unknown.stdout and "--force" in unknown.stdout
    forced = tool(str(tmp_path), "--force")
    assert forced.returncode == 0 and "warning: removing a lock" in forced.stderr
    assert not (tmp_path / "run.lock").exists()
    missing = tool(str(tmp_path / "nope"))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


def test_the_lock_file_records_what_proves_its_holder_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "c1")
    with RunLock(tmp_path, "training"):
        record = json.loads((tmp_path / "run.lock").read_text())
        holder = read_holder(tmp_path)
    assert {"host", "boot_id", "pid_ns", "pid", "start_ticks", "token", "purpose", "started", "flock"} <= set(record)
    assert (record["slurm_job_id"], record["slurm_array_job_id"], record["slurm_array_task_id"]) == ("77", "70", "3")
    assert record["slurm_restart_count"] == 2 and record["slurm_cluster"] == "c1"
    assert "Slurm job 77, array 70_3, restart 2, cluster c1" in holder.describe()


def test_checkpoint_tool_lock_from_the_command_line(tmp_path):
    write_record(tmp_path, stale_holder())
    cmd = [sys.executable, "-m", "launch.checkpoint_tool", "lock", str(tmp_path), "--break"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "stale: pid " in proc.stdout and "removed " in proc.stdout, proc.stderr
    assert not (tmp_path / "run.lock").exists()
    proc = subprocess.run([*cmd, "--force"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr  # one or the other
