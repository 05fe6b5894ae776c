"""Where this process sits in the job, whoever launched it, and the process group from there.

Launchers supported, in the order they are recognised:
- ``deepspeed`` and ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set;
- ``srun`` (Slurm): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR from the environment
  (the sbatch script exports the first node's address) or the job's first node name, MASTER_PORT
  from the environment or derived from the job id, so all tasks agree without talking;
- nothing: a single process on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torch" (deepspeed/torchrun), "slurm" or "single"


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N`` (added by the deepspeed launcher) so Hydra never sees it."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        out.append(arg)
    return out


def slurm_port(job_id: str) -> int:
    """A port every task of a Slurm job derives alike from its id (15000-34999)."""
    return 15000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def first_slurm_node(nodelist: str) -> str:
    """First host of a compact Slurm node list, e.g. ``gpu[07-09,12],cpu3`` -> ``gpu07``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect(environ: dict[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torch",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = env.get("SLURM_JOB_ID", "0")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=int(re.match(r"\d+", tasks_per_node).group()),
            master_addr=env.get("MASTER_ADDR") or first_slurm_node(nodelist),
            master_port=int(env.get("MASTER_PORT") or slurm_port(job_id)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(launch: LaunchEnv, backend: str | None, timeout_s: int) -> str:
    """Export the rendezvous variables and initialise torch.distributed through DeepSpeed.

    Returns the backend: NCCL where CUDA is available, gloo otherwise (unless given).
    """
    import torch

    from moe_parallel.integration.deepspeed import init_distributed as deepspeed_init_distributed

    os.environ.update(
        RANK=str(launch.rank),
        WORLD_SIZE=str(launch.world_size),
        LOCAL_RANK=str(launch.local_rank),
        LOCAL_WORLD_SIZE=str(launch.local_world_size),
        MASTER_ADDR=launch.master_addr,
        MASTER_PORT=str(launch.master_port),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed_init_distributed(backend, timedelta(seconds=timeout_s))
    return backend


def is_interactive() -> bool:
    return sys.stderr.isatty()


def watch_deepspeed_launcher(on_gone: Callable[[int], None], interval_s: float = 1.0) -> int | None:
    """Under DeepSpeed's local launcher, call ``on_gone(pid)`` once the ``deepspeed`` command has exited.

    ``deepspeed`` runs ``python -m deepspeed.launcher.launch``, which starts the workers. SIGTERM to
    the ``deepspeed`` command ends only that process (it installs no handler): ``launch`` and the
    workers would train on, orphaned, to the last step. A daemon thread here notices within
    ``interval_s`` that ``launch`` lost its parent, and ``on_gone`` (the trainer: "stop as on SIGTERM")
    runs. Returns the watched pid, or None when this process was not started by that launcher.
    """
    try:
        import psutil

        launcher = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in " ".join(launcher.cmdline()):
            return None
        runner = launcher.ppid()
    except Exception:  # no psutil, no /proc, a parent already gone: nothing to watch
        return None

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            try:
                alive = launcher.is_running() and launcher.ppid() == runner
            except Exception:
                alive = False
            if not alive:
                on_gone(runner)
                return

    threading.Thread(target=watch, name="deepspeed-launcher-watch", daemon=True).start()
    return runner
