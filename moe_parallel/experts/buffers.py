"""Large CPU weight-gradient buffers: from the allocator where it keeps them, else huge-page mappings,
optionally recycled from step to step.

The stacked experts' weight gradients are one ``[e, D, F]`` tensor per parameter, allocated at every
backward (autograd hands it to ``param.grad``; ZeRO copies and frees it; ``zero_grad`` drops it).
Above glibc's mmap threshold (at most 32 MiB by default) each such allocation is a new anonymous
mapping whose every page faults on first write, and the step pays for that inside its GEMMs. A
module-per-expert layer (DeepSpeed's) allocates 4 MiB per expert, which glibc recycles from its heap.

Where the process's allocator is configured to keep freed memory of that size (glibc's
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``, or their ``GLIBC_TUNABLES``, above the
buffer's size; jemalloc, tcmalloc or mimalloc preloaded), the buffers come from it like any tensor:
freed memory comes back warm and serves activations too, which neither a mapping nor the pool can.
Otherwise a new buffer is a mapping advised ``MADV_HUGEPAGE`` where the kernel offers transparent
huge pages (a fault per 2 MiB, not per 4 KiB), and with the pool on, a buffer whose tensors are all
gone is handed out again, warm, as glibc keeps small blocks: the step then pays no page faults for it.

The pool is off by default (``MOE_PARALLEL_GRAD_POOL=1`` or :func:`set_gradient_pool` turns it on):
its idle buffers stay resident through the next forward, where a layer that frees its gradients
leaves that memory to the activations, so it raises a step's peak by up to the size of the expert
weights. It holds as many buffers as were ever alive at once, like any caching allocator;
:func:`release_cached_buffers` returns the idle ones to the OS. Only weight gradients come from it:
an activation gradient in a buffer that something else holds would be summed out of place by
autograd (it adds in place only into a tensor it holds alone).
"""

from __future__ import annotations

import functools
import mmap
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

POOLED_BUFFER_MIN_BYTES = 32 << 20  # glibc's largest mmap threshold: smaller buffers come from its heap
_HUGE_PAGE_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


# "always": the kernel already backs large mappings with huge pages; "madvise": only when asked; "never": off.
HUGE_PAGES_AVAILABLE = _HUGE_PAGE_ADVICE is not None and _thp_mode() in ("always", "madvise")

_pool: list[torch.UntypedStorage] = []
_pool_lock = threading.Lock()
_pool_enabled = os.environ.get("MOE_PARALLEL_GRAD_POOL", "0") == "1"


_KEEPING_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@functools.cache
def process_environ() -> dict[str, str]:
    """The environment this process started with: what the allocator read at startup (later changes to
    ``os.environ`` do not reconfigure it)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def _glibc_setting(environ: Mapping[str, str], env_name: str, tunable: str) -> int | None:
    """A glibc malloc setting from its environment variable or from ``GLIBC_TUNABLES`` (bytes)."""
    values = [environ.get(env_name)]
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name == f"glibc.malloc.{tunable}":
            values.append(value)
    for value in reversed(values):  # as in glibc, a GLIBC_TUNABLES entry wins over the variable
        try:
            return int(value, 0)
        except (TypeError, ValueError):
            continue
    return None


def allocator_keeps(nbytes: int, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the process's allocator, as configured, serves a freed block of ``nbytes`` again
    without returning it to the OS: a preloaded caching allocator, or glibc told (mmap and trim
    thresholds above ``nbytes``, or mmap off) to keep blocks that large on its heap.

    ``environ``: the environment to read the configuration from (default: the one this process
    started with, :func:`process_environ`)."""
    env = process_environ() if environ is None else environ
    if any(name in env.get("LD_PRELOAD", "") for name in _KEEPING_ALLOCATORS):
        return True
    mmap_max = _glibc_setting(env, "MALLOC_MMAP_MAX_", "mmap_max")
    mmap_threshold = _glibc_setting(env, "MALLOC_MMAP_THRESHOLD_", "mmap_threshold")
    trim_threshold = _glibc_setting(env, "MALLOC_TRIM_THRESHOLD_", "trim_threshold")
    on_heap = mmap_max == 0 or (mmap_threshold is not None and mmap_threshold > nbytes)
    return on_heap and trim_threshold is not None and trim_threshold > nbytes


def set_gradient_pool(enabled: bool) -> None:
    """Recycle large CPU weight-gradient buffers from step to step (faster: no page faults; costs the
    idle buffers' memory between steps) or map each one afresh (the default). Turning it off
    releases the idle buffers."""
    global _pool_enabled
    _pool_enabled = enabled
    if not enabled:
        release_cached_buffers()


def _idle(storage: torch.UntypedStorage) -> bool:
    """No tensor (nor anyone else) holds this pooled storage: only the pool's own reference is left."""
    return torch._C._storage_Use_Count(storage._cdata) == 1


def _new_storage(nbytes: int) -> torch.UntypedStorage:
    if HUGE_PAGES_AVAILABLE:
        try:
            mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            mapping.madvise(_HUGE_PAGE_ADVICE)
            # The storage keeps the mapping alive; it is unmapped when the storage is freed.
            return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes).untyped_storage()
        except (OSError, ValueError):
            pass
    return torch.empty(nbytes, dtype=torch.uint8).untyped_storage()


def grad_buffer_like(t: Tensor) -> Tensor:
    """``torch.empty_like(t)`` (contiguous, uninitialised); for a large CPU ``t`` that the allocator
    would not keep, a huge-page mapping, recycled from the pool when it is on."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < POOLED_BUFFER_MIN_BYTES or allocator_keeps(nbytes):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    if not _pool_enabled:  # a fresh mapping, on huge pages where offered; freed with its tensor
        return torch.empty(0, dtype=t.dtype).set_(_new_storage(nbytes), 0, t.shape)
    with _pool_lock:  # the tensor exists before another thread can see the storage idle
        storage = next((s for s in _pool if s.nbytes() == nbytes and _idle(s)), None)
        if storage is None:
            storage = _new_storage(nbytes)
            _pool.append(storage)
        return torch.empty(0, dtype=t.dtype).set_(storage, 0, t.shape)


def release_cached_buffers() -> int:
    """Free the pooled buffers no tensor holds (as ``torch.cuda.empty_cache`` does on a GPU); returns
    the bytes released."""
    with _pool_lock:
        idle = [s for s in _pool if _idle(s)]
        _pool[:] = [s for s in _pool if not _idle(s)]
    return sum(s.nbytes() for s in idle)


def cached_bytes() -> tuple[int, int]:
    """(bytes in use, bytes idle) of the pool."""
    with _pool_lock:
        idle = sum(s.nbytes() for s in _pool if _idle(s))
        return sum(s.nbytes() for s in _pool) - idle, idle
