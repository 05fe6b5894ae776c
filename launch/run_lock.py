"""One job at a time per run directory: an exclusive lock, ``<run_dir>/run.lock``.

Two jobs training into one run directory (a job resubmitted beside its requeued self, a command
started twice) overwrite each other's checkpoints, rotate away the checkpoint the other is loading
and mix their steps in ``metrics.jsonl``. Rank 0 of the trainer takes this lock before it writes
anything and holds it until the process leaves; a second job stops at once, naming the holder.
Readers (``checkpoint_tool verify`` / ``export``, evaluation) never look at it.

    python -m launch.checkpoint_tool lock RUN_DIR            # who holds it, and whether provably gone
    python -m launch.checkpoint_tool lock RUN_DIR --break    # remove a lock whose holder is provably gone
    python -m launch.checkpoint_tool lock RUN_DIR --force    # remove it anyway (after checking yourself)

**The lock file.** ``run.lock`` is a JSON record of its holder: host, kernel boot id, PID namespace,
PID and the process's start time, user, Slurm job (id, array job and task, restart count, cluster),
purpose, start time and a random token. It is written in full and synced under a temporary name
(``run.lock.tmp-<token>``), then hard-linked to ``run.lock``. link(2) fails when the name exists,
decided by the file server, so of several jobs exactly one succeeds, and nobody reads a half-written
record. Where the file system has flock(2), the holder also keeps an exclusive flock on the file.

**Gone, provably; never by age.** A lock left by a holder that died without releasing it (SIGKILL,
a lost node) is stale only when one of these proves that its process ended:

- it is an earlier run of this very Slurm job (same job id and cluster, lower ``SLURM_RESTART_COUNT``):
  Slurm never runs two instances of one job, so a requeued job takes its predecessor's lock over;
- it ran on this kernel (same boot id) in this PID namespace, and its PID no longer runs, is a
  zombie, or is another process now (another start time: the PID was reused);
- it ran on this kernel in another PID namespace (a container), held a flock, and nobody holds it now;
- its host has this host's name but another boot id: the host has rebooted since;
- it is another Slurm job of this cluster, and ``scontrol show job`` reports it ended, pending (a
  requeued job not yet restarted), or unknown to the controller (purged after it ended).

Anything else (another host outside Slurm, a Slurm job that still runs, Slurm tools missing or a
query that fails, an unreadable record) counts as held. A flock held by another process (EWOULDBLOCK)
proves a live holder, whatever the rules above say.

**Taking over a stale lock.** Several jobs may find one stale lock at the same moment. Each first
claims the stale holder's token by hard-linking its own record to ``run.lock.break-<token>``: one
claim succeeds. The claimant reads ``run.lock`` again and, only if it still holds that token,
replaces it with its own record by rename(2), which swaps the name atomically: there is no moment
without a lock file in which a fresh job could slip in. The others see the claim, wait for it to
resolve and then find a live holder. A claimant that died between its claim and the rename is itself
a stale holder: its claim is taken over by the same protocol (``run.lock.break-<its token>``).

**What the file system must offer**, on every host that mounts the run directory:

- hard links, with link(2) failing (EEXIST) when the name exists, decided by the server, not a client
  cache (local file systems, NFSv3/v4, Lustre, GPFS, BeeGFS do; object-store FUSE mounts do not);
- rename(2) that replaces an existing name atomically;
- close-to-open consistency: a file written, synced and closed on one host reads complete on another;
- flock(2) is optional: coherent across hosts (NFSv4, Lustre mounted ``-o flock``, GPFS) it also
  proves a live holder on other hosts; host-local (Lustre ``localflock``, NFS ``local_lock``) it proves
  something on the holder's host only; absent (Lustre ``noflock``) the holder records that it has none.

Host names must be unique among the hosts that share the directory, and ``/proc`` must be Linux's.
Clocks are never compared.

**What it does not cover.** A Slurm job that the controller declares ended, or requeues, while its
processes still run (a node cut off from the controller but not from the file system) counts as
gone. A lock removed with ``--force`` while its holder still runs leaves two jobs in the directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import getpass
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_FILE = "run.lock"
TEMP_PREFIX = "run.lock.tmp-"
CLAIM_PREFIX = "run.lock.break-"
FORMAT = 1

ALIVE = "alive"  # proven to run
GONE = "gone"  # proven to have ended: the lock is stale
UNKNOWN = "unknown"  # neither: counts as held

_ATTEMPTS = 100  # rounds of link / inspect / take over before giving up (contention lasts milliseconds)
_RETRY_S = 0.05
_MAX_CLAIM_DEPTH = 3  # claims of claims: each level needs one more job to die inside a few syscalls
_SLURM_TIMEOUT_S = 15.0
# Slurm job states in which the job's processes may run; COMPLETING and friends are flags that
# `scontrol` shows in place of the base state while processes are still being cleaned up.
_SLURM_ACTIVE = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "CONFIGURING", "SIGNALING", "STAGE_OUT",
                 "RESIZING", "REQUEUED", "POWER_UP_NODE", "UPDATE_DB"}  # fmt: skip
# States in which none of the job's processes runs: ended, or waiting to (re)start.
_SLURM_IDLE = {"PENDING", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
               "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED", "REQUEUE_HOLD", "REQUEUE_FED"}  # fmt: skip
_SLURM_UNKNOWN_JOB = "UNKNOWN_JOB"  # `scontrol show job` says "Invalid job id specified"


class RunLockError(RuntimeError):
    """The run directory's lock cannot be taken or changed (an I/O error, a file system without hard links)."""


class RunDirLocked(RunLockError):
    """Another job holds the run directory; the message names the directory, the holder and the fix."""


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

    def __init__(self, timeout_s: float = _SLURM_TIMEOUT_S) -> None:
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


# ---------------------------------------------------------------- looking at a lock file


@dataclass(frozen=True)
class LockState:
    """A lock file as found: its holder (None: the record cannot be read) and whether that holder runs."""

    path: Path
    holder: Holder | None
    verdict: Verdict
    problem: str = ""  # why the record cannot be read


def inspect(
    directory: str | os.PathLike, *, here: Holder | None = None, slurm: SlurmQuery | None = None
) -> LockState | None:
    """The lock of a run directory, or None when it is not locked."""
    return _inspect_file(Path(directory) / LOCK_FILE, here=here, slurm=slurm)


def read_holder(directory: str | os.PathLike) -> Holder | None:
    """Who holds a run directory (None: nobody, or a record that cannot be read); no verdict, no Slurm query."""
    try:
        return Holder.from_json((Path(directory) / LOCK_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _inspect_file(path: Path, *, here: Holder | None = None, slurm: SlurmQuery | None = None) -> LockState | None:
    # The record and the flock probe come from one open file: the same lock, even if it is replaced meanwhile.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RunLockError(f"cannot read the lock {path}: {err}") from None
    try:
        text = _read_fd(fd)
        flock_held = _probe_flock(fd)
    finally:
        os.close(fd)
    try:
        holder = Holder.from_json(text)
    except ValueError as err:
        state = ALIVE if flock_held else UNKNOWN
        return LockState(path, None, Verdict(state, f"its record cannot be read ({err})"), problem=str(err))
    here = here or Holder.current("inspect")
    return LockState(path, holder, judge(holder, here, flock_held=flock_held, slurm=slurm))


def _probe_flock(fd: int) -> bool | None:
    """True: another process holds the file's flock; False: nobody does; None: the file system cannot say."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def locked_message(directory: Path, state: LockState) -> str:
    """What a job that finds the run directory locked says."""
    holder = state.holder.describe() if state.holder is not None else "a job whose record cannot be read"
    return (
        f"run directory {directory} is in use: {holder} holds its lock {state.path}, and {state.verdict.reason}. "
        "Two jobs in one run directory overwrite each other's checkpoints and metrics. Wait for that job to end, "
        f"or give this one another train.run_dir. If it has ended: `python -m launch.checkpoint_tool lock {directory}` "
        "shows whether that can be proven (then --break removes the lock), and --force removes it after you have "
        "checked yourself."
    )


# ---------------------------------------------------------------- taking and releasing it


class _Record:
    """This process's record under a temporary name, flocked and synced: what ``run.lock`` or a claim will name."""

    def __init__(self, directory: Path, purpose: str) -> None:
        self.directory = directory
        token = secrets.token_hex(8)
        self.temp = directory / f"{TEMP_PREFIX}{token}"
        try:
            self.fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise RunLockError(f"cannot lock the run directory {directory}: {err}") from None
        try:
            flocked = _try_flock(self.fd)
            self.holder = Holder.current(purpose, token=token, flock=flocked)
            os.write(self.fd, self.holder.to_json().encode())
            os.fsync(self.fd)
        except OSError as err:
            self.drop_temp()
            self.close()
            raise RunLockError(f"cannot lock the run directory {directory}: {err}") from None
        self._links = 0

    def link_as(self, name: Path) -> bool:
        """Give the record the name ``name``; False when the name exists (and is not this record)."""
        try:
            os.link(self.temp, name)
            return True
        except FileExistsError:
            return self.names(name)  # NFS: a retransmitted link that did succeed answers EEXIST
        except OSError as err:
            if err.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                raise RunLockError(
                    f"{self.directory} is on a file system without hard links ({err}): the run directory's lock "
                    "needs them; put train.run_dir on a POSIX file system (local disk, NFS, Lustre, GPFS)"
                ) from None
            raise RunLockError(f"cannot lock the run directory {self.directory}: {err}") from None

    def rename_over(self, name: Path) -> None:
        """Replace ``name`` with the record, atomically (the name never stops existing)."""
        self._links += 1
        staged = self.temp.with_name(f"{self.temp.name}-{self._links}")
        try:
            os.link(self.temp, staged)
            os.rename(staged, name)
        except OSError as err:
            _unlink_quietly(staged)
            raise RunLockError(f"cannot lock the run directory {self.directory}: {err}") from None

    def names(self, name: Path) -> bool:
        """Whether ``name`` is this record (the same file, not a copy)."""
        try:
            found, mine = os.stat(name), os.fstat(self.fd)
        except OSError:
            return False
        return (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino)

    def drop_temp(self) -> None:
        """Remove the temporary name; the file stays open, and so does its flock, until :meth:`close`."""
        _unlink_quietly(self.temp)

    def close(self) -> None:
        os.close(self.fd)


_TAKEN, _LOST, _BUSY = "taken", "lost", "busy"


def _take_over(record: _Record, target: Path, stale: Holder, *, remove: bool = False, depth: int = 0) -> str:
    """Replace ``target`` (a lock or a claim holding ``stale``'s record) with ``record`` (or remove it).

    ``taken``: done; ``lost``: ``target`` no longer holds ``stale`` (someone else took it over, or it
    was released): look again; ``busy``: another job is taking it over right now: look again shortly.
    """
    claim = target.with_name(f"{CLAIM_PREFIX}{stale.token}")
    if not record.link_as(claim):
        if depth >= _MAX_CLAIM_DEPTH:
            return _BUSY
        claimant = _inspect_file(claim, here=record.holder)
        if claimant is None:
            return _BUSY  # resolved meanwhile
        if claimant.holder is None or not claimant.verdict.stale:
            return _BUSY
        # The claimant died between its claim and its rename: its claim is a stale lock of its own.
        if _take_over(record, claim, claimant.holder, depth=depth + 1) != _TAKEN:
            return _BUSY
    try:
        if _token_of(target) != stale.token:
            return _LOST
        if remove:
            os.unlink(target)
        else:
            record.rename_over(target)
        return _TAKEN
    except OSError as err:
        raise RunLockError(f"cannot take over the lock {target}: {err}") from None
    finally:
        _unlink_quietly(claim)


class RunLock:
    """The exclusive lock of a run directory, held by one process (rank 0 of a job) until :meth:`release`.

    ``with RunLock(run_dir, "training"):`` takes it or raises :class:`RunDirLocked` (another job holds
    it) / :class:`RunLockError` (it cannot be taken: permissions, a file system without hard links).
    A lock left by a job that is provably gone is taken over; :attr:`took_over` then says whose.
    """

    def __init__(self, directory: str | os.PathLike, purpose: str = "training") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.purpose = purpose
        self.holder: Holder | None = None  # this process's record while held
        self.took_over: LockState | None = None  # the stale lock this one replaced
        self._record: _Record | None = None

    @property
    def held(self) -> bool:
        return self._record is not None

    def acquire(self) -> RunLock:
        """Take the lock; see the class docstring."""
        if self._record is not None:
            raise RunLockError(f"{self.path} is already held by this process")
        record = _Record(self.directory, self.purpose)
        try:
            self.took_over = self._install(record)
        except BaseException:
            record.drop_temp()
            record.close()
            raise
        record.drop_temp()
        _sync_dir(self.directory)
        self._record, self.holder = record, record.holder
        return self

    def _install(self, record: _Record) -> LockState | None:
        for _ in range(_ATTEMPTS):
            if record.link_as(self.path):
                return None
            state = _inspect_file(self.path, here=record.holder)
            if state is None:
                continue  # released meanwhile
            if not state.verdict.stale:
                raise RunDirLocked(locked_message(self.directory, state))
            outcome = _take_over(record, self.path, state.holder)
            if outcome == _TAKEN:
                return state
            if outcome == _BUSY:
                time.sleep(_RETRY_S * (1 + random.random()))
        raise RunLockError(
            f"could not take the lock {self.path} in {_ATTEMPTS} attempts: other jobs kept taking it over "
            f"(see {self.directory}/{CLAIM_PREFIX}*); `python -m launch.checkpoint_tool lock {self.directory}` shows it"
        )

    def release(self) -> None:
        """Remove the lock file (if it is still this process's) and drop the flock; safe to call twice."""
        record, self._record = self._record, None
        if record is None:
            return
        try:
            if record.names(self.path):
                os.unlink(self.path)
                _sync_dir(self.directory)
            else:
                print(f"warning: {self.path} is no longer this job's lock (removed with --force?): left as it is",
                      file=sys.stderr, flush=True)  # fmt: skip
        except OSError as err:
            print(f"warning: could not remove the lock {self.path}: {err}", file=sys.stderr, flush=True)
        finally:
            record.close()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def break_lock(directory: str | os.PathLike, *, force: bool = False) -> LockState | None:
    """Remove a run directory's lock whose holder is provably gone (``force``: whatever its state).

    Returns the lock as it was (None: there was none). Raises :class:`RunLockError` when it is not
    provably stale and ``force`` is not given. Safe against jobs that take it over at the same time.
    """
    directory = Path(directory)
    path = directory / LOCK_FILE
    for _ in range(_ATTEMPTS):
        state = _inspect_file(path)
        if state is None:
            return None
        if not state.verdict.stale and not force:
            raise RunLockError(
                f"the lock of {directory} is not provably stale: {state.holder.describe() if state.holder else 'a job'}"
                f" holds it, and {state.verdict.reason}. If you have made sure it has ended, --force removes the lock"
            )
        if state.holder is None:  # an unreadable record (only with force): nothing to claim by
            _unlink_quietly(path)
            return state
        if force:
            _unlink_quietly(directory / f"{CLAIM_PREFIX}{state.holder.token}")
        record = _Record(directory, "checkpoint_tool lock --break")
        try:
            outcome = _take_over(record, path, state.holder, remove=True)
        finally:
            record.drop_temp()
            record.close()
        if outcome == _TAKEN:
            _sync_dir(directory)
            return state
        if outcome == _BUSY:
            time.sleep(_RETRY_S * (1 + random.random()))
    raise RunLockError(f"could not break the lock {path}: other jobs kept taking it over")


# ---------------------------------------------------------------- checkpoint_tool lock


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``lock`` to ``launch.checkpoint_tool``'s sub-commands."""
    lock = sub.add_parser("lock", help="who holds a run directory, and whether provably gone; --break / --force")
    lock.add_argument("dir", help="the run directory (or its run.lock)")
    group = lock.add_mutually_exclusive_group()
    group.add_argument(
        "--break", dest="break_", action="store_true", help="remove a lock whose holder is provably gone"
    )
    group.add_argument("--force", action="store_true", help="remove the lock even if its holder may still run")
    lock.set_defaults(func=cmd_lock)


def cmd_lock(args: argparse.Namespace) -> int:
    """``checkpoint_tool lock DIR [--break | --force]``: 0 when done, 2 on an error."""
    directory = Path(args.dir)
    if directory.name == LOCK_FILE:
        directory = directory.parent
    try:
        if not directory.is_dir():
            raise RunLockError(f"{directory} is not a directory")
        state = inspect(directory)
        if state is None:
            print(f"{directory}: not locked")
            return 0
        _print_state(state)
        if not (args.break_ or args.force):
            return 0
        if args.force and not state.verdict.stale:
            print(
                f"warning: removing a lock whose holder cannot be proven gone ({state.verdict.reason}): if it still "
                f"runs, two jobs now write {directory}",
                file=sys.stderr,
            )
        broken = break_lock(directory, force=args.force)
    except RunLockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"removed {state.path}" if broken is not None else f"{directory}: not locked any more")
    return 0


def _print_state(state: LockState) -> None:
    holder = state.holder.describe() if state.holder else f"a record that cannot be read ({state.problem})"
    print(f"{state.path}: held by {holder}")
    hint = {
        ALIVE: "",
        GONE: " (--break removes the lock)",
        UNKNOWN: " (--force removes the lock once you have made sure that job has ended)",
    }[state.verdict.state]
    label = {ALIVE: "alive", GONE: "stale", UNKNOWN: "unknown"}[state.verdict.state]
    print(f"{label}: {state.verdict.reason}{hint}")


# ---------------------------------------------------------------- small helpers


def _try_flock(fd: int) -> bool:
    """Take an exclusive flock on a fresh file: False where the file system has none (e.g. Lustre noflock)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _token_of(path: Path) -> str | None:
    try:
        return Holder.from_json(path.read_text()).token
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None


def _read_fd(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


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


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _sync_dir(path: Path) -> None:
    """Make the directory's new names durable (a no-op where directories cannot be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
