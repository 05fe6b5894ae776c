"""This process's resident memory from ``/proc/self/status`` and a reset of its high-water mark
(Linux). Standard library only, so that a measured child process imports nothing else for it."""

from __future__ import annotations

import re
from pathlib import Path


def status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


def reset_high_water_mark() -> None:
    """Restart ``VmHWM`` from the current resident set (``/proc/self/clear_refs`` = 5)."""
    Path("/proc/self/clear_refs").write_text("5")
