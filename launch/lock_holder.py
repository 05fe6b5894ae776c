"""Who holds a run directory's lock, and whether that process provably still runs.

The record a lock file holds (:class:`Holder`) and the rules that judge it (:func:`judge`); the lock
protocol that uses them is :mod:`launch.run_lock`, whose docstring states the rules for users.
Everything here only reads: ``/proc``, the kernel's boot id, and the Slurm controller through
``scontrol`` (each answer None where it cannot tell).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FORMAT = 1

ALIVE = "alive"  # proven to run
GONE = "gone"  # proven to have ended: the lock is stale
UNKNOWN = "unknown"  # neither: counts as held

SLURM_TIMEOUT_S = 15.0
# Slurm job states in which the job's processes may run; COMPLETING and friends are flags that
# `scontrol` shows in place of the base state while processes are still being cleaned up.
_SLURM_ACTIVE = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "CONFIGURING", "SIGNALING", "STAGE_OUT",
                 "RESIZING", "REQUEUED", "POWER_UP_NODE", "UPDATE_DB"}  # fmt: skip
# States in which none of the job's processes runs: ended, or waiting to (re)start.
_SLURM_IDLE = {"PENDING", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
               "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED", "REQUEUE_HOLD", "REQUEUE_FED"}  # fmt: skip
_SLURM_UNKNOWN_JOB = "UNKNOWN_JOB"  # `scontrol show job` says "Invalid job id specified"


# ---------------------------------------------------------------- who holds it


@dataclass(frozen=True)
class Holder:
    """The record in ``run.lock``: which process holds the run directory, and how to tell if it still runs."""

    token: str  # random, unique to one acquisition
    host: str
    pid: int
    start_ticks: int | None  # the process's start time (/proc/<pid>/stat), in clock ticks since boot
    boot_id: str  # /proc/sys/kernel/random/boot_id: PIDs and start times mean something on this kernel only
    pid_ns: str  # /proc/self/ns/pid: PIDs mean something in this namespace only
    user: str
    purpose: str
    started: float  # seconds since the epoch, for people (never compared)
    flock: bool = False  # whether the holder keeps a flock on the file
    slurm_job_id: str | None = None
    slurm_array_job_id: str | None = None
    slurm_array_task_id: str | None = None
    slurm_restart_count: int = 0
    slurm_cluster: str | None = None
    format: int = FORMAT

    @classmethod
    def current(cls, purpose: str, token: str | None = None, flock: bool = False) -> Holder:
        """This process's record."""
        env = os.environ
        return cls(
            token=token or secrets.token_hex(8),
            host=socket.gethostname(),
            pid=os.getpid(),
            start_ticks=_start_ticks(os.getpid()),
            boot_id=_read_text("/proc/sys/kernel/random/boot_id"),
            pid_ns=_pid_namespace(),
            user=_user(),
            purpose=purpose,
            started=time.time(),
            flock=flock,
            slurm_job_id=env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"),
            slurm_array_job_id=env.get("SLURM_ARRAY_JOB_ID"),
            slurm_array_task_id=env.get("SLURM_ARRAY_TASK_ID"),
            slurm_restart_count=_int(env.get("SLURM_RESTART_COUNT"), 0),
            slurm_cluster=env.get("SLURM_CLUSTER_NAME"),
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Holder:
        """Parse a record; ValueError when it is not one."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            holder = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise ValueError(f"fields missing: {err}") from None
        # A field of the wrong type could make a live holder look gone (a start time that never matches).
        for name, types in _FIELD_TYPES.items():
            value = getattr(holder, name)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ValueError(f"{name}={value!r} is not a {' or '.join(t.__name__ for t in types)}")
        if not holder.token:
            raise ValueError("the token is empty")
        return holder

    def describe(self) -> str:
        """E.g. ``the training job (pid 12 on host gpu01, Slurm job 77, restart 1, user ann, started ...)``."""
        slurm = []
        if self.slurm_job_id:
            slurm.append(f"Slurm job {self.slurm_job_id}")
            if self.slurm_array_job_id and self.slurm_array_task_id:
                slurm.append(f"array {self.slurm_array_job_id}_{self.slurm_array_task_id}")
            slurm.append(f"restart {self.slurm_restart_count}")
            if self.slurm_cluster:
                slurm.append(f"cluster {self.slurm_cluster}")
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        details = ", ".join([f"pid {self.pid} on host {self.host}", *slurm, f"user {self.user}", f"started {since}"])
        return f"the {self.purpose} job ({details})"


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "token": (str,),
    "host": (str,),
    "pid": (int,),
    "start_ticks": (int, type(None)),
    "boot_id": (str,),
    "pid_ns": (str,),
    "user": (str,),
    "purpose": (str,),
    "started": (int, float),
    "flock": (bool,),
    "slurm_job_id": (str, type(None)),
    "slurm_array_job_id": (str, type(None)),
    "slurm_array_task_id": (str, type(None)),
    "slurm_restart_count": (int,),
    "slurm_cluster": (str, type(None)),
}


@dataclass(frozen=True)
class Verdict:
    """Whether a holder still runs: ``alive``, ``gone`` (the lock is stale) or ``unknown`` (counts as held)."""

    state: str
    reason: str  # a clause: "pid 12 still runs on this host"

    @property
    def stale(self) -> bool:
        return self.state == GONE


@dataclass(frozen=True)
class ProcessInfo:
    """A running process as /proc shows it."""

    start_ticks: int | None  # None: it runs, but its start time is unreadable (another user's, hidepid)
    zombie: bool


class SlurmQuery:
    """Asks the Slurm controller (``scontrol``) about jobs; every answer is None where it cannot tell."""

    def __init__(self, timeout_s: float = SLURM_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._cluster: str | None = None

    def _run(self, *args: str) -> subprocess.CompletedProcess | None:
        if shutil.which("scontrol") is None:
            return None
        try:
            return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=self.timeout_s)
        except (OSError, subprocess.SubprocessError):
            return None

    def job_state(self, job_id: str) -> str | None:
        """The job's state (``RUNNING``, ``COMPLETED``, ...; ``UNKNOWN_JOB`` when the controller does not know it)."""
        if not re.fullmatch(r"\d+", job_id or ""):  # from a file: never pass anything else to scontrol
            return None
        proc = self._run("show", "job", "-o", job_id)
        if proc is None:
            return None
        if proc.returncode != 0:
            return _SLURM_UNKNOWN_JOB if "invalid job id" in (proc.stderr + proc.stdout).lower() else None
        found = re.search(r"\bJobState=(\S+)", proc.stdout)
        return found.group(1) if found else None

    def cluster(self) -> str | None:
        """This host's Slurm cluster name (``SLURM_CLUSTER_NAME`` in a job, else the controller's ``ClusterName``)."""
        if self._cluster is None:
            self._cluster = os.environ.get("SLURM_CLUSTER_NAME") or ""
            proc = None if self._cluster else self._run("show", "config")
            if proc is not None and proc.returncode == 0:
                found = re.search(r"^ClusterName\s*=\s*(\S+)", proc.stdout, re.MULTILINE)
                self._cluster = found.group(1) if found else ""
        return self._cluster or None


def judge(
    holder: Holder,
    here: Holder,
    *,
    flock_held: bool | None = None,
    process: Callable[[int], ProcessInfo | None] | None = None,
    slurm: SlurmQuery | None = None,
) -> Verdict:
    """Whether ``holder`` still runs, as seen from ``here`` (this process's record); see the module docstring.

    ``flock_held``: the probe of the lock file's flock (True: another process holds it; False: nobody
    does; None: not known). ``process`` and ``slurm`` look up processes and Slurm jobs (tests pass fakes).
    """
    process = process or process_info
    same_kernel = bool(holder.boot_id) and holder.boot_id == here.boot_id
    if flock_held:  # proof of life, whatever else is known; the pid, where it can be seen, says it better
        verdict = _judge_on_this_kernel(holder, here, flock_held, process) if same_kernel else None
        if verdict is not None and verdict.state == ALIVE:
            return verdict
        return Verdict(ALIVE, "a process holds its flock on the lock file")
    if _earlier_run_of_this_job(holder, here):
        return Verdict(
            GONE,
            f"it was restart {holder.slurm_restart_count} of Slurm job {holder.slurm_job_id}, which runs as restart "
            f"{here.slurm_restart_count} now (Slurm never runs two instances of one job)",
        )
    if same_kernel:
        verdict = _judge_on_this_kernel(holder, here, flock_held, process)
        if verdict is not None:
            return verdict
    elif holder.host == here.host and holder.boot_id and here.boot_id and not holder.host.startswith("localhost"):
        return Verdict(GONE, f"host {holder.host} has rebooted since (its kernel's boot id changed)")
    if holder.slurm_job_id and not _same_slurm_job(holder, here):
        verdict = _judge_by_slurm(holder, here, slurm or SlurmQuery())
        if verdict is not None:
            return verdict
    if same_kernel:
        where = f"in another PID namespace of this host ({holder.pid_ns or '?'}), where its pid cannot be looked up"
    else:
        where = f"on host {holder.host}, not this one ({here.host})"
    if _same_slurm_job(holder, here):
        slurm_note = f", in this same Slurm job {holder.slurm_job_id} (restart {holder.slurm_restart_count})"
    elif holder.slurm_job_id:
        slurm_note = f", and Slurm cannot tell about job {holder.slurm_job_id}"
    else:
        slurm_note = ", outside Slurm"
    return Verdict(UNKNOWN, f"it cannot be proven gone: it ran {where}{slurm_note}")


def _same_slurm_job(holder: Holder, here: Holder) -> bool:
    return bool(here.slurm_job_id) and holder.slurm_job_id == here.slurm_job_id and _same_cluster(holder, here)


def _same_cluster(holder: Holder, here: Holder) -> bool:
    return not (holder.slurm_cluster and here.slurm_cluster) or holder.slurm_cluster == here.slurm_cluster


def _earlier_run_of_this_job(holder: Holder, here: Holder) -> bool:
    return _same_slurm_job(holder, here) and holder.slurm_restart_count < here.slurm_restart_count


def _judge_on_this_kernel(
    holder: Holder, here: Holder, flock_held: bool | None, process: Callable[[int], ProcessInfo | None]
) -> Verdict | None:
    if holder.pid_ns and holder.pid_ns == here.pid_ns:
        info = process(holder.pid)
        if info is None:
            return Verdict(GONE, f"pid {holder.pid} no longer runs on this host")
        if info.zombie:
            return Verdict(GONE, f"pid {holder.pid} has exited (a zombie not yet reaped)")
        if info.start_ticks is None:
            return Verdict(UNKNOWN, f"pid {holder.pid} runs on this host, but its start time is unreadable here")
        if holder.start_ticks is not None and info.start_ticks != holder.start_ticks:
            return Verdict(GONE, f"pid {holder.pid} is another process now (it started later: the pid was reused)")
        return Verdict(ALIVE, f"pid {holder.pid} still runs on this host")
    if holder.flock and flock_held is False:
        return Verdict(GONE, "no process of this host holds its flock any more (it ran in another PID namespace)")
    return None


def _judge_by_slurm(holder: Holder, here: Holder, slurm: SlurmQuery) -> Verdict | None:
    job = holder.slurm_job_id
    state = slurm.job_state(job)
    if state is None:
        return None
    if state == _SLURM_UNKNOWN_JOB:
        cluster = here.slurm_cluster or slurm.cluster()
        if holder.slurm_cluster and cluster == holder.slurm_cluster:
            return Verdict(GONE, f"Slurm job {job} is unknown to the controller of cluster {cluster} (it ended)")
        return None  # another cluster's job, or one we cannot place: no proof
    if holder.slurm_cluster and holder.slurm_cluster != (here.slurm_cluster or slurm.cluster()):
        return None  # the same number names another job here
    if state in _SLURM_ACTIVE:
        return Verdict(ALIVE, f"Slurm reports job {job} {state}")
    if state in _SLURM_IDLE:
        return Verdict(GONE, f"Slurm reports job {job} {state}: none of its processes runs")
    return None


def process_info(pid: int) -> ProcessInfo | None:
    """The process ``pid`` of this PID namespace, or None when no such process runs."""
    if not isinstance(pid, int) or pid <= 0:
        return ProcessInfo(None, False)  # not a pid: nothing to prove
    try:
        fields = _read_text(f"/proc/{pid}/stat", strict=True).rpartition(")")[2].split()
        return ProcessInfo(int(fields[19]), fields[0] in ("Z", "X"))
    except (OSError, IndexError, ValueError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it runs, as another user, hidden from /proc (hidepid)
    return ProcessInfo(None, False)


# ---------------------------------------------------------------- small helpers


def _read_text(path: str, strict: bool = False) -> str:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        if strict:
            raise
        return ""


def _start_ticks(pid: int) -> int | None:
    info = process_info(pid)
    return info.start_ticks if info is not None else None


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
