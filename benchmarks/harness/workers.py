"""The processes an implementation runs in: one per EP rank, started by spawn, driven over a pipe.

Every implementation lives in processes of its own: glibc's heap state (its dynamic mmap and trim
thresholds, its free lists) then depends only on that implementation's own allocations, not on
which implementation happened to run before it in the same process. A worker builds its problem,
answers with its row counts, and then runs the parent's commands until ``"stop"``:

- ``"step"`` / ``"step:NAME"``: one timed forward+backward (of ``NAME`` in a shared process);
- ``("measure", fn)``: ``fn(step, target)`` on the first implementation's step, answered as it
  returns (a module-level function, pickled by name: peak memory, a profile);
- ``"path"``: the path our experts take on this input;
- ``"expert_gemm:P0,P1,..."``: rank r's experts run path ``Pr`` from now on.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import multiprocessing as mp
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

from benchmarks.harness.configs import BenchConfig, Target
from benchmarks.harness.peers import BUILDERS, make_problem, our_expert_path, row_counts
from launch.env import free_port
from moe_parallel.integration.deepspeed import unlink_shm_allreduce_buffers

# glibc serves every allocation from its heap and keeps freed memory, instead of mapping each buffer
# above 32 MiB afresh (and page-faulting it in) on every step.
TUNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def reexec_under(env: dict[str, str], script: str, argv: list[str]) -> None:
    """Run ``script argv`` again in this process under ``env`` unless it is already set: glibc reads
    its tunables at start-up, and the workers inherit them from this process."""
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, script, *argv], {**os.environ, **env})


def init_distributed(rank: int, world_size: int, port: int, target: Target) -> None:
    """A gloo (CPU) or NCCL (GPU) group on 127.0.0.1, also registered with deepspeed.comm (its MoE needs it)."""
    import deepspeed

    backend = "nccl" if target.device == "cuda" else "gloo"
    if target.device == "cuda":
        torch.cuda.set_device(target.device_for(rank))
    init = f"tcp://127.0.0.1:{port}"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world_size)
    with contextlib.redirect_stdout(io.StringIO()):  # "... built successfully" banners
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    unlink_shm_allreduce_buffers()


def quiet_deepspeed(target: Target) -> None:
    """DeepSpeed on ``target``'s accelerator, its log and warnings silenced."""
    os.environ.setdefault("DS_ACCELERATOR", target.device)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


class StepFailed(str):
    """A worker's answer to "step" when the step raised (the message)."""


def _worker(conn, cfg: BenchConfig, impl: str, rank: int, port: int, target: Target) -> None:
    """One rank of one implementation (``"a+b+..."``: several in this one process); runs the parent's
    commands until "stop" (see the module docstring)."""
    if target.threads:
        torch.set_num_threads(target.threads)
    quiet_deepspeed(target)
    distributed = cfg.ep_size > 1 or "deepspeed" in impl.split("+")
    if distributed:
        init_distributed(rank, cfg.ep_size, port, target)
    elif target.device == "cuda":
        torch.cuda.set_device(target.device_for(rank))

    def fence() -> None:
        target.sync()
        if cfg.ep_size > 1:
            dist.barrier()

    problem = make_problem(cfg, ep_group=dist.group.WORLD if cfg.ep_size > 1 else None, rank=rank, target=target)
    # Several implementations in one process give ratios with no process-to-process difference in
    # them (heap layout, page placement).
    steps = {name: BUILDERS[name](problem) for name in impl.split("+")}
    step = steps[impl.split("+")[0]]
    gc.freeze()  # the gc.collect() before each step then scans the step's garbage, not the whole heap
    conn.send(row_counts(problem))
    while (command := conn.recv()) != "stop":
        if isinstance(command, tuple) and command[0] == "measure":
            conn.send(command[1](step, target))
        elif command.startswith("step"):
            chosen = steps[command.split(":", 1)[1]] if ":" in command else step
            gc.collect()
            fence()
            start = time.perf_counter()
            try:
                chosen()
            except RuntimeError as err:  # e.g. out of memory: this implementation fails, the others go on
                if cfg.ep_size > 1:  # the other rank may wait in a collective: end the process group
                    raise
                conn.send(StepFailed(str(err)[:500]))
                chosen.clear_grads()
                continue
            fence()
            conn.send(time.perf_counter() - start)
            # The next step, of whichever implementation, starts with no gradients alive.
            chosen.clear_grads()
        elif command == "path":  # which expert path our layer takes on this input (experts/choice.py)
            conn.send(our_expert_path(problem))
        elif command.startswith("expert_gemm:"):  # this rank's experts run the named path from now on
            path = command.split(":", 1)[1].split(",")[rank]
            for pinned in steps.values():
                pinned.pin_expert_path(path)
            conn.send(None)
    if distributed:
        dist.destroy_process_group()


class Implementation:
    """The process(es) of one implementation on one config: one per EP rank.

    ``impl``: a name of :data:`peers.BUILDERS`, or several joined by ``+`` to run in one process;
    ``env``: added to the processes' environment (allocator settings); ``wait``: until they are built.
    """

    def __init__(
        self, cfg: BenchConfig, impl: str, target: Target, env: dict[str, str] | None = None, wait: bool = True
    ) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        saved = dict(os.environ)
        os.environ.update(env or {})  # a spawned child starts with the parent's environment
        try:
            self.conns, self.procs = [], []
            for rank in range(cfg.ep_size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, cfg, impl, rank, port, target), daemon=True)
                proc.start()
                self.conns.append(parent)
                self.procs.append(proc)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.kept_rows = 0
        self.busiest_routed = 0
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Until every rank has built its model (raises if a worker died)."""
        kept, busiest = zip(*self.receive())
        self.kept_rows, self.busiest_routed = sum(kept), max(busiest)

    def send(self, command: str | tuple) -> None:
        for conn in self.conns:
            conn.send(command)

    def receive(self) -> list:
        """One answer from every rank, in rank order (raises if a worker died)."""
        results = []
        for conn, proc in zip(self.conns, self.procs):
            died = "a benchmark worker died (exit code {}); see its stderr above"
            while not conn.poll(1.0):
                if not proc.is_alive():
                    raise RuntimeError(died.format(proc.exitcode))
            try:
                results.append(conn.recv())
            except EOFError:  # it died after the poll
                proc.join(timeout=10)
                raise RuntimeError(died.format(proc.exitcode)) from None
        return results

    def request(self, command: str | tuple) -> list:
        self.send(command)
        return self.receive()

    def measure(self, fn) -> list:
        """``fn(step, target)`` on every rank (``fn`` a module-level function), in rank order."""
        return self.request(("measure", fn))

    def step(self, name: str | None = None) -> float:
        """Seconds of one forward+backward: the slowest rank's (the step ends when all are done).
        ``name``: which implementation of a shared process ("a+b+...") runs; default the first.
        Raises RuntimeError if it failed on any rank."""
        results = self.request("step" if name is None else f"step:{name}")
        failures = [str(r) for r in results if isinstance(r, StepFailed)]
        if failures:
            raise RuntimeError(failures[0])
        return max(results)

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                with contextlib.suppress(OSError):
                    conn.send("stop")
        for proc in self.procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()


def start_implementations(
    cfg: BenchConfig, names: tuple[str, ...], target: Target
) -> tuple[dict[str, Implementation], dict[str, str]]:
    """One process (group) per implementation, started together; returns (live ones, failed ones)."""
    impls, failed = {}, {}
    for name in names:
        impls[name] = Implementation(cfg, name, target.for_config(cfg), wait=False)
    for name in list(impls):
        try:
            impls[name].wait_ready()
        except RuntimeError as err:
            failed[name] = str(err)
            impls.pop(name).close()
    return impls, failed
