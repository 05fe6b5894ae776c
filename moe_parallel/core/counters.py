"""Exact counts of what a GPU cluster pays for in a step: collectives, the bytes they send, host syncs.

A CPU run cannot show an all-to-all's latency across nodes or a stalled launch queue, but it can count
them exactly: ``count_collectives`` wraps the ``torch.distributed`` collectives (DeepSpeed's
``deepspeed.comm`` calls them too), ``count_host_syncs`` records every read of a device value by the
host. Both are context managers whose counts tests assert and benchmarks report.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

# The collectives a step can make; point-to-point send/recv count as one each.
COLLECTIVES = (
    "all_to_all_single",
    "all_to_all",
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "all_gather_object",
    "broadcast_object_list",
)


@dataclass
class CollectiveLog:
    """The collectives called on this rank, in order, and the bytes each sent to *other* ranks."""

    calls: list[str] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.calls)

    @property
    def total_bytes_sent(self) -> int:
        return sum(self.bytes_sent)

    def by_name(self) -> Counter:
        return Counter(self.calls)


def _nbytes(t: object) -> int:
    if isinstance(t, Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _bytes_to_others(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes this rank sends to other ranks in one call (the part a network carries)."""
    group = kwargs.get("group")
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    if name == "all_to_all_single":
        inp = args[1] if len(args) > 1 else kwargs["input"]
        splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
        row_bytes = inp[0].numel() * inp.element_size() if inp.dim() > 0 and inp.shape[0] > 0 else 0
        if splits is None:
            return _nbytes(inp) * (size - 1) // max(size, 1)
        return sum(n for r, n in enumerate(splits) if r != rank) * row_bytes
    if name == "all_to_all":
        inputs = args[1] if len(args) > 1 else kwargs["input_tensor_list"]
        return sum(_nbytes(t) for r, t in enumerate(inputs) if r != rank)
    if name in ("all_reduce", "broadcast", "reduce", "send", "isend"):
        tensor = args[0] if args else kwargs.get("tensor")
        return _nbytes(tensor) * (1 if name in ("send", "isend") else max(size - 1, 0))
    if name in ("all_gather", "all_gather_into_tensor", "_all_gather_base"):
        inp = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("tensor"))
        return _nbytes(inp) * max(size - 1, 0)
    if name in ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter"):
        inp = args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_list"))
        return _nbytes(inp) * max(size - 1, 0) // max(size, 1)
    return 0


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    """Record every ``torch.distributed`` collective called inside the block (any caller, any group)."""
    log = CollectiveLog()
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            log.calls.append(name)
            log.bytes_sent.append(_bytes_to_others(name, args, kwargs))
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


@dataclass
class HostSyncLog:
    """Every read of a device value by the host, in order: the op (or Python method) that read it."""

    reads: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.reads)


def _is_host_read(func, args: tuple, kwargs: dict) -> bool:
    tags = func.tags
    if torch.Tag.data_dependent_output in tags:
        return True
    if torch.Tag.dynamic_output_shape not in tags:
        return False
    packet = func.overloadpacket
    if packet is torch.ops.aten.repeat_interleave:  # known output size: nothing to read
        return kwargs.get("output_size") is None and (len(args) < 3 or args[-1] is None)
    if packet in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    return True


class _HostSyncMode(TorchDispatchMode):
    def __init__(self, log: HostSyncLog) -> None:
        super().__init__()
        self.log = log
        self.depth = 0  # inside a counted Python-level read: its own dispatches are part of it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0 and _is_host_read(func, args, kwargs):
            self.log.reads.append(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncLog]:
    """Record every host read of device data inside the block, each counted once.

    Counts ``_local_scalar_dense`` (``.item()``, ``int()``, ``bool()``), every op tagged with a
    data-dependent output shape (``nonzero``, ``bincount``, boolean indexing, ``repeat_interleave``
    without ``output_size``) and ``Tensor.tolist()``, which reads without dispatching. On a CPU
    tensor these cost nothing; on a GPU each one stalls the host until the device catches up.
    """
    log = HostSyncLog()
    mode = _HostSyncMode(log)
    original_tolist = Tensor.tolist

    def tolist(self):
        if mode.depth == 0:
            log.reads.append("tolist")
        mode.depth += 1
        try:
            return original_tolist(self)
        finally:
            mode.depth -= 1

    Tensor.tolist = tolist
    try:
        with mode:
            yield log
    finally:
        Tensor.tolist = original_tolist
