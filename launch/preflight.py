"""Pre-flight check of a freshly initialised process group: fail fast with a clear message, never hang.

The trainer calls :func:`check` right after ``init_distributed``. In two phases, each bounded by a
short timeout:

1. **Roll call over the rendezvous store** (the TCP store every rank already reached through
   MASTER_ADDR:MASTER_PORT, independent of NCCL/gloo): every rank posts its versions, host and device;
   rank 0 waits for all of them and posts one verdict that every rank reads. A rank that does not
   answer gives ``rank 3 did not answer within 60 s`` on every other rank; ranks that disagree on
   torch / deepspeed / moe_parallel versions or the git commit give a table of who runs what.
2. **A tiny all-to-all and all-reduce over the real backend**, with known answers. NCCL builds its
   communicators lazily, so this is where a broken fabric (wrong interface, blocked ports, InfiniBand
   trouble) shows itself: a watchdog thread ends the process with a message naming the backend and
   the NCCL settings to look at instead of letting the first training step hang for
   ``parallel.timeout_s``.

Environment: ``MOE_PREFLIGHT_TIMEOUT_S`` overrides the timeout, ``MOE_PREFLIGHT=0`` skips the check.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# Fields every rank must agree on; the others (host, device) are reported, not compared.
VERSION_FIELDS = ("torch", "deepspeed", "moe_parallel", "git_commit", "python")
# A watchdog that fires exits the process with this code (a plain failure: the sbatch scripts do not
# requeue it, since a broken network does not heal by retrying the same nodes).
EXIT_PREFLIGHT_HUNG = 3
_REPO = Path(__file__).resolve().parent.parent
_calls = 0  # every rank calls check() equally often, so this numbers the store keys alike everywhere


class PreflightError(RuntimeError):
    """The ranks of this job cannot train together; the message says which ranks and why."""


def default_timeout(collective_timeout_s: float, cap_s: float = 120.0) -> float:
    """The pre-flight timeout: ``MOE_PREFLIGHT_TIMEOUT_S`` if set, else the smaller of ``cap_s`` and
    the collectives' own timeout (a missing rank should be named well before training would time out)."""
    override = os.environ.get("MOE_PREFLIGHT_TIMEOUT_S")
    if override:
        return float(override)
    return float(min(cap_s, collective_timeout_s))


def _git_commit(repo: Path = _REPO) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:  # noqa: BLE001 - a broken install is exactly what we report
        return f"not importable ({type(exc).__name__})"
    return str(getattr(mod, "__version__", "unknown"))


def local_info() -> dict[str, Any]:
    """What this rank reports: versions (compared across ranks), host and device (shown)."""
    torch_version = torch.__version__ + (f" cuda {torch.version.cuda}" if torch.version.cuda else "")
    device = "cpu"
    if dist.is_initialized() and dist.get_backend() == "nccl" and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    return {
        "torch": torch_version,
        "deepspeed": _version("deepspeed"),
        "moe_parallel": _version("moe_parallel"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),  # Slurm may run several nodes on one host
        "device": device,
    }


def _ranges(ranks: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out: list[str] = []
    ranks = sorted(ranks)
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(out)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _who(ranks: list[int]) -> str:
    """``[3]`` -> ``"rank 3"``, ``[0, 1, 2]`` -> ``"ranks 0-2"``."""
    return f"rank{'' if len(ranks) == 1 else 's'} {_ranges(ranks)}"


def verdict(infos: dict[int, dict[str, Any]], world_size: int, timeout_s: float) -> str | None:
    """The error message for these ranks' reports, or None when they can train together."""
    missing = [r for r in range(world_size) if r not in infos]
    if missing:
        hosts = sorted({i["host"] for i in infos.values()})
        return (
            f"{_who(missing)} did not answer within {timeout_s:.0f} s "
            f"({_who(sorted(infos))} on {', '.join(hosts)} did). Look at the missing ranks' log for an "
            f"error before the pre-flight check; under Slurm check that srun started all {world_size} tasks."
        )
    problems = []
    for field in VERSION_FIELDS:
        groups: dict[str, list[int]] = {}
        for rank, info in sorted(infos.items()):
            groups.setdefault(str(info.get(field)), []).append(rank)
        if len(groups) > 1:
            parts = []
            for value, ranks in groups.items():
                hosts = sorted({infos[r]["host"] for r in ranks})
                parts.append(f"{value} on {_who(ranks)} ({', '.join(hosts[:4])}{', ...' if len(hosts) > 4 else ''})")
            problems.append(f"  {field}: " + "; ".join(parts))
    devices: dict[tuple[str, str], list[int]] = {}
    for rank, info in infos.items():
        if info.get("device", "cpu") != "cpu":
            devices.setdefault((info["host"], info["device"]), []).append(rank)
    for (host, device), ranks in sorted(devices.items()):
        if len(ranks) > 1:
            problems.append(
                f"  {_who(ranks)} all use {device} on {host}: run one task per GPU "
                f"(sbatch --ntasks-per-node equal to --gpus-per-node)"
            )
    if problems:
        return (
            "ranks disagree:\n"
            + "\n".join(problems)
            + "\nRun every rank from the same environment (venv or container) and the same git commit."
        )
    return None


def _default_store() -> Any | None:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - private API: without it we fall back to the backend alone
        return None


def _roll_call(
    store: Any,
    rank: int,
    world_size: int,
    info: dict[str, Any],
    timeout_s: float,
    gen: int,
) -> dict[int, dict[str, Any]]:
    """Phase 1 over the store: rank 0 collects every rank's info and posts the verdict."""
    prefix = f"moe_preflight/{gen}"
    store.set(f"{prefix}/rank/{rank}", json.dumps(info))
    verdict_key = f"{prefix}/verdict"
    deadline = time.monotonic() + timeout_s
    if rank == 0:
        keys = [f"{prefix}/rank/{r}" for r in range(world_size)]
        pending = set(range(world_size))
        while pending and time.monotonic() < deadline:
            answered = {r for r in pending if store.check([keys[r]])}
            pending -= answered
            if pending:
                time.sleep(0.05)
        infos = {r: json.loads(store.get(keys[r])) for r in range(world_size) if r not in pending}
        message = verdict(infos, world_size, timeout_s)
        store.set(verdict_key, json.dumps({"error": message, "infos": {str(k): v for k, v in infos.items()}}))
        if message:
            raise PreflightError(f"pre-flight check failed: {message}")
        return infos
    # Rank 0 answers within timeout_s of its own arrival; allow for ranks arriving a bit apart.
    try:
        store.wait([verdict_key], timedelta(seconds=2 * timeout_s + 5))
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError or DistStoreError by version
        raise PreflightError(
            f"pre-flight check failed: rank 0 did not answer within {2 * timeout_s + 5:.0f} s ({exc}). "
            f"Look at rank 0's log for an error before the pre-flight check."
        ) from None
    posted = json.loads(store.get(verdict_key))
    if posted["error"]:
        raise PreflightError(f"pre-flight check failed: {posted['error']}")
    return {int(k): v for k, v in posted["infos"].items()}


class _Watchdog:
    """Ends the process with ``message`` unless cancelled within ``timeout_s``: a hung collective
    cannot be interrupted from Python, and a clear exit beats waiting for NCCL's own timeout."""

    def __init__(self, timeout_s: float, message: str, exit: Callable[[int], None] = os._exit) -> None:
        self._timer = threading.Timer(timeout_s, self._fire, args=(message,))
        self._timer.daemon = True
        self._exit = exit

    def _fire(self, message: str) -> None:
        print(f"pre-flight check failed: {message}", file=sys.stderr, flush=True)
        self._exit(EXIT_PREFLIGHT_HUNG)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _collectives(rank: int, world_size: int, backend: str) -> None:
    """Phase 2: a tiny all-to-all and all-reduce with known answers over the real backend."""
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    send = torch.arange(world_size, dtype=torch.float32, device=device) + rank * world_size
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    want = torch.arange(world_size, dtype=torch.float32, device=device) * world_size + rank
    total = torch.ones(1, device=device)
    dist.all_reduce(total)
    if not torch.equal(recv, want) or total.item() != world_size:
        raise PreflightError(
            f"pre-flight check failed on rank {rank}: all_to_all/all_reduce over {backend} returned wrong "
            f"values (got {recv.tolist()}, want {want.tolist()}; sum {total.item()} != {world_size})."
        )


def check(
    timeout_s: float = 60.0,
    info: dict[str, Any] | None = None,
    verbose: bool = True,
) -> dict[int, dict[str, Any]]:
    """Check that all ranks are here, run the same code, and can exchange data; returns every rank's info.

    Raises :class:`PreflightError` on every rank (same message) when a rank is missing or versions
    differ; ends the process (exit code ``EXIT_PREFLIGHT_HUNG``) if a collective hangs. ``info``
    replaces this rank's report (tests use it to fake a mismatch).
    """
    global _calls
    _calls += 1
    if os.environ.get("MOE_PREFLIGHT", "1") == "0" or not dist.is_initialized():
        return {}
    rank, world_size, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    info = dict(local_info() if info is None else info)
    start = time.perf_counter()
    store = _default_store()
    if store is not None:
        infos = _roll_call(store, rank, world_size, info, timeout_s, _calls)
    else:  # no store to ask: the backend's all_gather, under the watchdog
        gathered: list[Any] = [None] * world_size
        with _Watchdog(
            timeout_s,
            f"all_gather over {backend} did not complete within {timeout_s:.0f} s "
            f"on rank {rank}: a rank is missing or stuck.",
        ):
            dist.all_gather_object(gathered, info)
        infos = dict(enumerate(gathered))
        message = verdict(infos, world_size, timeout_s)
        if message:
            raise PreflightError(f"pre-flight check failed: {message}")
    hint = (
        " Check NCCL_SOCKET_IFNAME (the interface the nodes reach each other on), NCCL_IB_HCA / "
        "NCCL_IB_DISABLE, and set NCCL_DEBUG=INFO to see where it stops."
        if backend == "nccl"
        else " Check GLOO_SOCKET_IFNAME and that the nodes can open TCP ports to each other."
    )
    with _Watchdog(
        timeout_s,
        f"all ranks answered, but a tiny all_to_all over {backend} did not complete "
        f"within {timeout_s:.0f} s on rank {rank}.{hint}",
    ):
        _collectives(rank, world_size, backend)
    if verbose and rank == 0:
        hosts = sorted({i["host"] for i in infos.values()})
        mine = infos[0]
        print(
            f"pre-flight ok in {time.perf_counter() - start:.1f} s: {_plural(world_size, 'rank')} on "
            f"{_plural(len(hosts), 'host')}, all_to_all over {backend}; torch {mine['torch']}, "
            f"deepspeed {mine['deepspeed']}, moe_parallel {mine['moe_parallel']} @ {mine['git_commit'][:12]}",
            flush=True,
        )
    return infos
