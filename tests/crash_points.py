"""Kill a process at an exact point of its file-system work, to test what a crash leaves behind.

A child interpreter runs ``module:function(*args)`` with an audit hook that counts the operations
that change files: opening a file for writing, each chunk written through a checkpoint writer, a
rename, a remove, a mkdir, an rmtree. ``run(..., kill_at=k)`` sends the child SIGKILL at its k-th
such operation (before the operation happens), the way a node failure or the OOM killer would: no
``finally`` runs, nothing is flushed. ``count(...)`` runs it to the end and returns how many there
were, so a test can draw kill points over the whole operation. ``delay_s`` kills after a time
instead, which also reaches work that no audit event shows (safetensors' and torch's native writers).

The function may call :func:`arm` when its preparation is done: only operations after that count.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_MUTATIONS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.link", "os.truncate")

_armed = False
_armed_at = 0.0
_events = 0
_kill_at: int | None = None


def arm() -> None:
    """Start counting (and killing) from here."""
    global _armed, _armed_at
    _armed_at = time.perf_counter()
    _armed = True


def _event() -> None:
    global _events
    if not _armed:
        return
    _events += 1
    if _kill_at is not None and _events >= _kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


def _hook(event: str, args: tuple) -> None:
    if event == "open":
        mode, flags = (args[1], args[2]) if len(args) > 2 else (args[1], 0)
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        if writes:
            _event()
    elif event in _MUTATIONS:
        _event()


def _count_checkpoint_writes() -> None:
    """Each chunk torch.save hands to a checkpoint file is a point too: a kill mid-file."""
    from moe_parallel.checkpoints import store as checkpoint_store

    write = checkpoint_store._ChecksumWriter.write

    def counted(self, data):
        _event()
        return write(self, data)

    checkpoint_store._ChecksumWriter.write = counted


def _child(target: str, args: list, kill_at: int | None, delay_s: float | None) -> None:
    global _kill_at
    _kill_at = kill_at
    module, _, function = target.partition(":")
    fn = getattr(importlib.import_module(module), function)
    _count_checkpoint_writes()
    sys.addaudithook(_hook)
    if delay_s is not None:
        timer = threading.Timer(delay_s, lambda: os.kill(os.getpid(), signal.SIGKILL))
        timer.daemon = True
        armed = threading.Thread(target=lambda: (_wait_armed(), timer.start()), daemon=True)
        armed.start()
    fn(*args)
    print(json.dumps({"events": _events, "seconds": time.perf_counter() - _armed_at}), flush=True)
    sys.stdout.flush()
    os._exit(0)


def _wait_armed() -> None:
    while not _armed:
        time.sleep(0.001)


@dataclass(frozen=True)
class Outcome:
    killed: bool
    events: int | None  # the count, when the function ran to its end
    seconds: float | None  # from arm() to the end, when it ran to its end
    stdout: str
    stderr: str


def run(target: str, *args, kill_at: int | None = None, delay_s: float | None = None, timeout: float = 180) -> Outcome:
    """Run ``target`` (``"module:function"``) with JSON-able ``args`` in a child; kill it as asked."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = (
        "import json, sys; from tests import crash_points; "
        "crash_points._child(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, target, json.dumps(list(args)), json.dumps(kill_at), json.dumps(delay_s)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )
    killed = proc.returncode == -signal.SIGKILL
    if not killed and proc.returncode != 0:
        raise AssertionError(f"{target} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    report = {} if killed else json.loads(proc.stdout.strip().splitlines()[-1])
    return Outcome(killed, report.get("events"), report.get("seconds"), proc.stdout, proc.stderr)


def count(target: str, *args, timeout: float = 180) -> Outcome:
    """Run ``target`` to its end: how many counted operations it makes after it arms, and how long that takes."""
    outcome = run(target, *args, timeout=timeout)
    assert outcome.events, f"{target} made no counted file operation after arm()"
    return outcome


def sweep(target: str, args: list, n: int, seed: int) -> list[tuple[int | None, float | None]]:
    """``n`` kill points over one run of ``target``: about three in four at counted operations, the
    rest (at least one of two or more) at a random time between arm() and the end."""
    import random

    measured = count(target, *args)
    timed = max(1, n // 4) if n >= 2 else 0
    gen = random.Random(seed)
    delays = [gen.uniform(0.0, measured.seconds) for _ in range(timed)]
    return [(k, None) for k in kill_points(measured.events, n - timed, seed)] + [(None, d) for d in delays]


def kill_points(total: int, n: int, seed: int) -> list[int]:
    """``n`` distinct kill points in [1, total], seeded; from four on, the first and the last among them."""
    import random

    if n >= total:
        return list(range(1, total + 1))
    gen = random.Random(seed)
    if n < 4:
        return sorted(gen.sample(range(1, total + 1), n))
    inner = list(range(2, total))
    gen.shuffle(inner)
    return sorted({1, total, *inner[: n - 2]})
