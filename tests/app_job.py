"""A training-app command started in its own session (as a shell runs a foreground job), its output
collected as it comes, for tests that signal, race or wait on running jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class AppJob:
    """``cmd`` run from the repository root; ``output`` grows while it runs."""

    def __init__(self, cmd: list[str]) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self.ended: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        """Until ``text`` shows in the output; fails if the job ends or the time runs out first."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.proc.poll() is None, f"job ended before {text!r}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.output[-4000:]}"
            time.sleep(0.1)

    def wait(self, timeout: float = 300) -> int:
        """The command's exit status, once it has ended and its output is read."""
        code = self.proc.wait(timeout=timeout)
        self.ended = time.monotonic()
        self._reader.join(timeout=10)
        return code

    @property
    def seconds(self) -> float:
        assert self.ended is not None
        return self.ended - self.started

    def kill(self) -> None:
        """SIGKILL the whole session (stopped processes too)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
