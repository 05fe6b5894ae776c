"""Large fresh CPU weight-gradient buffers on transparent huge pages.

The stacked experts' weight gradients are one ``[e, D, F]`` tensor per parameter, allocated fresh at
every backward (autograd hands it to ``param.grad``; ZeRO copies and frees it). Above glibc's mmap
threshold (at most 32 MiB) such an allocation is a new anonymous mapping, and the first write to each
of its 4 KiB pages is a page fault: 128 Ki faults for 512 MiB, about as long as the GEMMs that fill
it (BENCHMARKS.md, "Weight-gradient buffers"). Module-per-expert layers (DeepSpeed's) allocate 4 MiB
per expert, which glibc recycles from its heap. A mapping advised ``MADV_HUGEPAGE`` faults once per
2 MiB instead.

Used for weight gradients only, which ``AccumulateGrad`` takes over as ``param.grad``. An activation
gradient on such a mapping was summed out of place with the router's (measured: an extra ``[T, D]``
add per step; autograd adds in place only into a tensor whose storage it holds alone). Only CPU
tensors of at least ``HUGE_BUFFER_MIN_BYTES`` on Linux with transparent huge pages take this path;
everything else gets ``torch.empty``. The mapping is unmapped when the tensor's storage is freed.
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
    # The storage keeps the mapping alive; it is unmapped when the storage is freed.
    storage = torch.frombuffer(mapping, dtype=dtype, count=numel).untyped_storage()
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def fresh_empty_like(t: Tensor) -> Tensor:
    """``torch.empty_like(t)`` (contiguous), on huge pages when ``t`` is a large CPU tensor."""
    if t.device.type == "cpu":
        buffer = _huge_buffer(t.shape, t.dtype)
        if buffer is not None:
            return buffer
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)
