"""What a benchmark's report says besides its numbers (the machine, the command) and the writer of
the generated results blocks of BENCHMARKS.md.

A results block lies between ``<!-- bench_moe NAME begin -->`` and ``<!-- bench_moe NAME end -->``
and holds the command, the machine, the date and the table; everything outside the blocks is
hand-written and left as it is.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ENTRY_POINT = ".venv/bin/python benchmarks/bench_moe.py"


def fmt_mib(value: float) -> str:
    """MiB with the digits that matter: whole MiB from 10 up, one decimal below."""
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"


def cell(value: float | None, fmt: str) -> str:
    """A table cell: ``value`` formatted, or ``-`` where there is none."""
    return "-" if value is None else format(value, fmt)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` where it has none)."""
    try:
        return re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        return platform.processor() or platform.machine() or "cpu"


def versions_line() -> str:
    """torch's, DeepSpeed's and Python's versions, as every report states them."""
    import torch

    try:
        deepspeed = version("deepspeed")
    except PackageNotFoundError:
        deepspeed = "not installed"
    return f"torch {torch.__version__}, deepspeed {deepspeed}, Python {platform.python_version()}"


def machine_line(device: str, dtype: str, threads: int | None = None) -> str:
    """The machine of a layer benchmark: the GPU, or the CPU with its torch threads, and the versions."""
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, {dtype}, {versions_line()}"
    threads = threads or torch.get_num_threads()
    return (
        f"{os.cpu_count()}-core CPU ({cpu_model()}), {dtype}, {threads} torch threads at EP=1 and 1 per rank "
        f"at EP=2, {versions_line()}"
    )


def command_line(argv: list[str], script: str = ENTRY_POINT) -> str:
    """The command that reproduces a run, as a reader types it from the repository root."""
    return " ".join([script, *argv])


def write_results(path: Path, block: str, command: str, machine: str, table: str, command_note: str = "") -> None:
    """Replace the results block ``block`` of ``path`` (appended at the end where it has none yet);
    ``command_note`` follows the command in parentheses."""
    begin, end = f"<!-- bench_moe {block} begin -->", f"<!-- bench_moe {block} end -->"
    lines = [
        begin,
        f"Command: `{command}`" + (f" ({command_note})" if command_note else "") + "  ",
        f"Machine: {machine}  ",
        f"Date: {datetime.date.today().isoformat()}",
        "",
        table,
        end,
    ]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    before, rest = text.split(begin, 1)
    after = rest.split(end, 1)[1]
    path.write_text(before + "\n".join(lines) + after)


def write_json(path: Path, args: Any, command: str, machine: str, table: str, **fields: Any) -> None:
    """Write a run's results as JSON: what ran, where, when, the markdown table, then ``fields``."""
    results = {
        "command": command,
        "machine": machine,
        "date": datetime.date.today().isoformat(),
        "device": args.device,
        "dtype": args.dtype,
        **fields,
        "markdown": table,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
