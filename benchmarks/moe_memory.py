"""Peak memory of one forward+backward of each implementation, each in fresh processes of its own.

On CPU the peak is the growth of the resident set over the step (the kernel's high-water mark,
reset just before it), measured under :data:`MEMORY_ENV`; on a GPU it is the CUDA allocator's peak
over what was allocated before the step (exact per process, so the timing processes report it).
A tool of ``benchmarks/bench_moe.py`` (its comparison and its sweep).
"""

from __future__ import annotations

import gc
import sys

import torch

from benchmarks.harness.configs import BenchConfig, Target
from benchmarks.harness.peers import Step
from benchmarks.harness.procmem import reset_high_water_mark, status_bytes
from benchmarks.harness.workers import Implementation
from moe_parallel.experts.buffers import cached_bytes

MEMORY_IMPLS = ("ours", "deepspeed", "floor")
# Every tensor buffer above 64 KiB gets its own mmap, returned to the OS when freed, so that RSS
# follows the live tensors instead of glibc's cached free lists (see measure_step_peak_mib). The
# memory processes of a point run side by side, more threads than cores: OpenMP threads that sleep
# instead of spinning at a barrier leave the cores to the other processes (the peaks do not depend
# on it).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_WAIT_POLICY": "PASSIVE"}


def measure_step_peak_mib(step: Step) -> float:
    """Peak RSS growth of one step over the RSS just before it (MiB).

    After a warm-up step (lazy init, kernel caches) and with its gradients freed, the kernel's
    high-water mark is reset, one step runs, and its peak VmHWM is compared with the VmRSS before it:
    the extra memory the step needed at its worst moment (activations, saved tensors, temporaries,
    gradients of weights and input). Our pooled gradient buffers (``experts/buffers.py``) stay
    resident between steps, idle: they are counted as the step's, not as the baseline's, since a
    layer that frees its gradients leaves that memory to the forward.
    """
    step()
    step.clear_grads()
    gc.collect()
    base = status_bytes("VmRSS") - cached_bytes()[1]
    reset_high_water_mark()
    step()
    return (status_bytes("VmHWM") - base) / 2**20


def measure_step_peak_mib_cuda(step: Step) -> float:
    """GPU: peak allocated memory of one step over the memory allocated just before it (MiB)."""
    step()
    step.clear_grads()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def step_peak_mib(step: Step, target: Target) -> float:
    """A worker's ``measure`` command: the peak of one step on ``target``'s device."""
    return measure_step_peak_mib_cuda(step) if target.device == "cuda" else measure_step_peak_mib(step)


def run_memory(
    cfg: BenchConfig, impls: tuple[str, ...], target: Target, expert_paths: list[str] | None = None
) -> dict[str, float]:
    """Peak MiB of one step of each implementation, each in fresh processes of its own (the larger
    rank's, at EP > 1); on CPU under MEMORY_ENV. The processes run side by side: a peak is a
    per-process count, unaffected by what the others do. One that fails has no entry.

    ``expert_paths`` (one per rank): the path our experts took where they were timed, pinned here so
    that the memory is that path's (the drop-in's and ``moved``'s experts would otherwise resolve
    their own)."""
    env = MEMORY_ENV if target.device == "cpu" else None
    procs = {impl: Implementation(cfg, impl, target.for_config(cfg), env=env, wait=False) for impl in impls}
    pinned = {impl for impl in impls if expert_paths and impl != "deepspeed"}
    peak = {}
    try:
        for impl, proc in procs.items():  # queued behind the build
            if impl in pinned:
                proc.send("expert_gemm:" + ",".join(expert_paths))
            proc.send(("measure", step_peak_mib))
        for impl, proc in procs.items():
            try:
                proc.wait_ready()
                if impl in pinned:
                    proc.receive()
                peak[impl] = max(proc.receive())
            except RuntimeError as err:
                print(f"peak memory of {impl}: {err}", file=sys.stderr)
    finally:
        for proc in procs.values():
            proc.close()
    return peak
