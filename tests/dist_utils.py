"""The one harness for multi-process tests: a test body on several CPU processes joined by gloo on 127.0.0.1.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, sets the rendezvous
variables a launcher sets (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``), initialises the default process group (plain ``torch.distributed`` or through
``deepspeed.init_distributed``), calls ``fn(rank, world_size, *args)`` and returns what every rank
returned, in rank order. ``fn`` and ``args`` must be picklable (a module-level function); a failure on
any rank fails the test with that rank's traceback, and a hang past ``timeout`` kills every process.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from launch.env import free_port  # noqa: F401 (tests import it from here)

# Every collective of a test fails after this long instead of waiting for the harness timeout.
GROUP_TIMEOUT = timedelta(seconds=60)
INITS = ("torch", "deepspeed")


def _entry(rank: int, fn: Callable, world_size: int, port: int, init: str, args: tuple, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch

    torch.set_num_threads(1)  # R processes share 2 cores
    if init == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False, timeout=GROUP_TIMEOUT)
    else:  # the user's own torch.distributed, DeepSpeed's comm left uninitialised
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=GROUP_TIMEOUT)
    try:
        results.put((rank, fn(rank, world_size, *args)))  # a SimpleQueue writes before put returns
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown, as launch/train.py does: under load, a rank sometimes dies
    # there of SIGABRT ("terminate called without an active exception", a C++ thread of the store or
    # gloo still joinable at exit) after its test body has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0, init: str = "torch"
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return each rank's result.

    ``init``: ``"torch"`` (``torch.distributed.init_process_group``) or ``"deepspeed"``
    (``deepspeed.init_distributed``, which also sets up DeepSpeed's comm layer). The first rank that
    raises fails the call with its traceback (``torch.multiprocessing.ProcessRaisedException``); a
    process still running after ``timeout`` seconds fails it with ``TimeoutError`` once every process
    is killed.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}: one of {INITS}")
    results = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), init, args, results),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    returned: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while True:
        while not results.empty():  # drained while waiting: a large result must not block its rank
            rank, value = results.get()
            returned[rank] = value
        if ctx.join(timeout=1.0):
            break
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"distributed test {fn.__name__} on {world_size} ranks hung for {timeout:.0f}s")
    while not results.empty():
        rank, value = results.get()
        returned[rank] = value
    return [returned[rank] for rank in range(world_size)]
