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

import errno
import fcntl
import os
import random
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.lock_holder import ALIVE, UNKNOWN, Holder, SlurmQuery, Verdict, judge
from moe_parallel.checkpoints.store import sync_dir

LOCK_FILE = "run.lock"
TEMP_PREFIX = "run.lock.tmp-"
CLAIM_PREFIX = "run.lock.break-"
_ATTEMPTS = 100  # rounds of link / inspect / take over before giving up (contention lasts milliseconds)
_RETRY_S = 0.05
_MAX_CLAIM_DEPTH = 3  # claims of claims: each level needs one more job to die inside a few syscalls


class RunLockError(RuntimeError):
    """The run directory's lock cannot be taken or changed (an I/O error, a file system without hard links)."""


class RunDirLocked(RunLockError):
    """Another job holds the run directory; the message names the directory, the holder and the fix."""


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
        sync_dir(self.directory)
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
                sync_dir(self.directory)
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
            sync_dir(directory)
            return state
        if outcome == _BUSY:
            time.sleep(_RETRY_S * (1 + random.random()))
    raise RunLockError(f"could not break the lock {path}: other jobs kept taking it over")


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


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
