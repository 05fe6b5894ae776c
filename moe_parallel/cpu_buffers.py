"""Large fresh CPU buffers on transparent huge pages.

The stacked experts' weight gradients are one ``[e, D, F]`` tensor per parameter, allocated fresh at
every backward (autograd hands it to ``param.grad``; ZeRO copies and frees it). Above glibc's mmap
threshold (at most 32 MiB) such an allocation is a new anonymous mapping, and the first write to each
of its 4 KiB pages is a page fault: 128 Ki faults for 512 MiB, about as long as the GEMMs that fill
it (BENCHMARKS.md, "Weight-gradient buffers"). Module-per-expert layers (DeepSpeed's) allocate 4 MiB
per expert, which glibc recycles from its heap. A mapping advised ``MADV_HUGEPAGE`` faults once per
2 MiB instead, and the kernel's zeroed pages make a zero-filled buffer free.

Only CPU tensors of at least ``HUGE_BUFFER_MIN_BYTES`` on Linux take this path; everything else (and
any platform without ``madvise``) gets ``torch.empty``/``torch.zeros``. The returned tensors are
ordinary tensors: the mapping lives as long as the tensor's storage and is unmapped with it.
"""

from __future__ import annotations

import mmap

import torch
from torch import Tensor

HUGE_BUFFER_MIN_BYTES = 32 << 20  # glibc's largest mmap threshold: smaller buffers come from its heap
_HUGE_PAGE_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


# "always": the kernel already backs large mappings with huge pages; "madvise": only when asked; "never": off.
HUGE_PAGES_AVAILABLE = _HUGE_PAGE_ADVICE is not None and _thp_mode() in ("always", "madvise")


def _huge_buffer(shape: torch.Size, dtype: torch.dtype) -> Tensor | None:
    numel = shape.numel()
    nbytes = numel * dtype.itemsize
    if not HUGE_PAGES_AVAILABLE or nbytes < HUGE_BUFFER_MIN_BYTES:
        return None
    try:
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(_HUGE_PAGE_ADVICE)
    except (OSError, ValueError):
        return None
    # The tensor's storage keeps the mapping alive; it is unmapped when the last view is freed.
    return torch.frombuffer(mapping, dtype=dtype, count=numel).view(shape)


def fresh_empty_like(t: Tensor) -> Tensor:
    """``torch.empty_like(t)`` (contiguous), on huge pages when ``t`` is a large CPU tensor."""
    if t.device.type == "cpu":
        buffer = _huge_buffer(t.shape, t.dtype)
        if buffer is not None:
            return buffer
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def fresh_zeros_like(t: Tensor) -> Tensor:
    """``torch.zeros_like(t)`` (contiguous); a large CPU one is a fresh mapping, zero without a fill pass."""
    if t.device.type == "cpu":
        buffer = _huge_buffer(t.shape, t.dtype)
        if buffer is not None:
            return buffer
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device)
