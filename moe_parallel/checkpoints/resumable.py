"""An output directory written file by file in a staging directory beside it, so that a conversion
killed part-way continues where it stopped when the same command runs again.

    .<out>.tmp-resume/                  the future ``out``, renamed into place when the work is complete
      .resume-journal.jsonl             the command's fingerprint, then one line per finished file
      .resume-writer.json / .lock       who is writing (host, PID), and a lock held while it runs
      <files of the output>             each finished file is listed in the journal with its size and CRC-32

A file enters the journal only after it is written and synced, so a file the journal does not list
(a write cut short) is removed and written again; a listed file is checked against its size and
CRC-32 (SHA-256 too when checkpoints are signed) before it is trusted. A staging directory holding
the work of another command (another source, dtype or option) is emptied, and the caller is told so.
A live writer is refused: on this host by the lock and its PID, on another host by its record, which
nothing here can prove stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .store import STAGING_MARK, CheckpointError, check_file, pid_running, remove_tree, sync_dir

CONTROL_PREFIX = ".resume-"  # the staging's own files (and their temporary names), never output
JOURNAL = f"{CONTROL_PREFIX}journal.jsonl"
WRITER = f"{CONTROL_PREFIX}writer.json"
LOCK = f"{CONTROL_PREFIX}writer.lock"


class OutputInUse(CheckpointError):
    """Another conversion is writing the same output."""


def resumable_staging(out: Path) -> Path:
    """The fixed staging directory of ``out``: the same name on every run, so that a rerun finds it."""
    return out.with_name(f".{out.name}{STAGING_MARK}resume")


class ResumableOutput:
    """The staging directory of one output, its journal and its writer's claim.

    ``say`` receives one line for each thing a user should know (work resumed, work discarded).
    """

    def __init__(self, out: Path, fingerprint: dict[str, Any], say: Callable[[str], None] = print) -> None:
        self.out = out
        self.tree = resumable_staging(out)
        self.fingerprint = fingerprint
        self.say = say
        self.finished: dict[str, dict[str, Any]] = {}
        self._lock_fd: int | None = None

    # ------------------------------------------------------------ opening

    def open(self) -> None:
        """Claim the staging directory and keep the finished work a rerun of this command can use."""
        self.tree.mkdir(parents=True, exist_ok=True)
        self._claim()
        fingerprint, entries = self._read_journal()
        if fingerprint is None and not self._work_files():
            pass  # nothing there yet
        elif fingerprint != self.fingerprint:
            self._discard(fingerprint)
        else:
            self._keep_verified(entries)
        self._rewrite_journal()

    def _claim(self) -> None:
        fd = os.open(self.tree / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputInUse(self._in_use(self._writer(), live=True)) from None
        self._lock_fd = fd
        writer = self._writer()
        if writer is not None and not self._writer_gone(writer):
            os.close(fd)  # the record stays: it is the other writer's
            self._lock_fd = None
            raise OutputInUse(self._in_use(writer, live=writer.get("host") == socket.gethostname()))
        _write_json(self.tree / WRITER, {"host": socket.gethostname(), "pid": os.getpid()})

    def _writer(self) -> dict[str, Any] | None:
        try:
            writer = json.loads((self.tree / WRITER).read_text())
        except (OSError, ValueError):
            return None
        return writer if isinstance(writer, dict) else None

    @staticmethod
    def _writer_gone(writer: dict[str, Any]) -> bool:
        """Provably gone: a process of this host that no longer runs. Another host's writer may live."""
        if writer.get("host") != socket.gethostname():
            return False
        pid = writer.get("pid")
        return not isinstance(pid, int) or pid == os.getpid() or not pid_running(pid)

    def _in_use(self, writer: dict[str, Any] | None, *, live: bool) -> str:
        who = f"host {writer.get('host')}, pid {writer.get('pid')}" if writer else "another process"
        if live:
            return (
                f"--out {self.out} is being written by a conversion that is still running ({who}; its work is in "
                f"{self.tree}): wait for it to finish, or stop it and run this command again to continue its work"
            )
        return (
            f"--out {self.out} was being written by a conversion on {who}, which this host cannot see: if that "
            f"process no longer runs, delete {self.tree / WRITER} and run this command again (the finished work "
            f"in {self.tree} is kept); if it still runs, wait for it"
        )

    # ------------------------------------------------------------ the journal

    def _read_journal(self) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
        """(fingerprint, {file: entry}); a line cut short by a kill ends the journal there."""
        try:
            lines = (self.tree / JOURNAL).read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return None, {}
        fingerprint, entries = None, {}
        for number, line in enumerate(lines):
            try:
                record = json.loads(line)
            except ValueError:
                break
            if number == 0:
                fingerprint = record.get("fingerprint") if isinstance(record, dict) else None
            elif isinstance(record, dict) and isinstance(record.get("file"), str):
                entries[record["file"]] = record.get("entry")
        return fingerprint, entries

    def _rewrite_journal(self) -> None:
        lines = [{"fingerprint": self.fingerprint}] + [{"file": f, "entry": e} for f, e in self.finished.items()]
        tmp = self.tree / f"{JOURNAL}.new"
        with open(tmp, "w") as file:
            file.write("".join(json.dumps(line) + "\n" for line in lines))
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self.tree / JOURNAL)
        sync_dir(self.tree)

    def record(self, rel: str, entry: dict[str, Any]) -> None:
        """``rel`` is written and synced: a rerun keeps it (after checking it against ``entry``).

        The line is not synced: one lost in a crash only makes the rerun write its file again."""
        with open(self.tree / JOURNAL, "a") as file:
            file.write(json.dumps({"file": rel, "entry": entry}) + "\n")
        self.finished[rel] = entry

    def entry(self, rel: str) -> dict[str, Any] | None:
        """The journal's entry of ``rel`` when a run before this one finished it, else None."""
        return self.finished.get(rel)

    @property
    def finished_bytes(self) -> int:
        return sum(int(entry.get("bytes", 0)) for entry in self.finished.values())

    # ------------------------------------------------------------ what a rerun keeps

    def _work_files(self) -> list[str]:
        """Every file under the staging directory but its control files, relative to it."""
        files = []
        for path in self.tree.rglob("*"):
            rel = path.relative_to(self.tree).as_posix()
            if path.is_file() and not rel.startswith(CONTROL_PREFIX):
                files.append(rel)
        return sorted(files)

    def _discard(self, fingerprint: dict[str, Any] | None) -> None:
        files = self._work_files()
        if fingerprint is None:
            why = "without a journal"
        else:
            changed = sorted(
                k for k in {*fingerprint, *self.fingerprint} if fingerprint.get(k) != self.fingerprint.get(k)
            )
            why = f"of a different command (changed: {', '.join(changed)})"
        self.say(f"{self.tree}: discarding {len(files)} file(s) left by a conversion {why}; starting clean")
        for entry in self.tree.iterdir():
            if entry.name not in (LOCK, WRITER):
                remove_tree(entry)

    def _keep_verified(self, entries: dict[str, dict[str, Any]]) -> None:
        bad = []
        for rel, entry in entries.items():
            try:
                check_file(self.tree, rel, entry)
            except (CheckpointError, KeyError, TypeError, OSError):
                bad.append(rel)
                continue
            self.finished[rel] = entry
        stray = [rel for rel in self._work_files() if rel not in self.finished]
        for rel in stray:
            (self.tree / rel).unlink(missing_ok=True)
        redo = len(set(bad) | set(stray))
        size = self.finished_bytes / 2**20
        self.say(
            f"{self.tree}: resuming an interrupted conversion of the same command: {len(self.finished)} finished "
            f"file(s) ({size:.1f} MiB) kept" + (f", {redo} incomplete or damaged file(s) written again" if redo else "")
        )

    # ------------------------------------------------------------ closing

    def release(self) -> None:
        """Give up the claim, keeping the finished work for a rerun."""
        if self._lock_fd is None:
            return
        (self.tree / WRITER).unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    def publish(self) -> None:
        """Rename the complete output into place (``out`` missing or empty); nothing of the staging stays."""
        (self.tree / JOURNAL).unlink(missing_ok=True)
        (self.tree / LOCK).unlink(missing_ok=True)
        (self.tree / WRITER).unlink(missing_ok=True)
        sync_dir(self.tree)
        os.replace(self.tree, self.out)  # onto a missing or empty directory: atomic
        sync_dir(self.out.parent)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


@contextlib.contextmanager
def resumable_output(
    out: Path, fingerprint: dict[str, Any], say: Callable[[str], None] = print
) -> Iterator[ResumableOutput]:
    """Open ``out``'s staging (resuming the same command's work), yield it, publish it when the body
    succeeds; on failure keep the finished work for a rerun (none: remove the staging) and release the claim."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = ResumableOutput(out, fingerprint, say)
    staged.open()
    try:
        yield staged
        staged.publish()
    finally:
        staged.release()
        if staged.tree.is_dir() and not staged.finished:  # refused or failed before any work: leave nothing
            remove_tree(staged.tree)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def free_bytes(path: Path) -> int:
    """Bytes free on the file system that holds ``path`` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free
