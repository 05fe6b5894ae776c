"""Model-state bytes on one rank under DeepSpeed ZeRO 0/1/2: predicted from a meta-device stage, measured
from a real engine.

What a rank holds for its model, apart from activations:

* ``params``: the parameters as the engine holds them. Under ZeRO 1/2, and DeepSpeed's ``BF16_Optimizer``
  (ZeRO 0 with bf16), every optimizer group lives in one flat buffer padded to a multiple of
  ``2 * group_size`` elements (DeepSpeed's ``nccl_start_alignment_factor`` times the group's data-parallel
  size; with ``zero_optimization.parameter_alignment`` each parameter is also padded to 16 bytes); the
  parameters are views of it.
* ``grads``: the gradient storage held at the end of a step's backward, before the optimizer step.
* ``master``: the fp32 master copies (this rank's partition of each flat group).
* ``optimizer``: AdamW's ``exp_avg`` and ``exp_avg_sq`` and its per-parameter ``step`` counters.
* ``buffers``: DeepSpeed's gradient bucket buffers (``reduce_bucket_size`` elements each, two with
  ``overlap_comm``), which ZeRO 1/2 allocate before the reduction and release at the end of backward.
  DeepSpeed 0.19.8's all-gather of updated parameters runs on views of the flat buffers and allocates no
  bucket of ``allgather_bucket_size``; ZeRO 0 preallocates no bucket either (its gradient all-reduce flattens
  a bucket at a time and frees it).

Expert parameters (DeepSpeed's ``allreduce=False``) form their own optimizer groups, partitioned over the
expert-data-parallel group (``dp / ep`` ranks); every other group partitions over the ``dp`` ranks of the
stage. The bucket buffers serve both kinds and are counted as non-expert.

Shape suffixes: none here (flat element counts only).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .model import StageModel, dtype_bytes, is_expert_param

COMPONENTS = ("params", "grads", "master", "optimizer", "buffers")
PRECISIONS = ("fp32", "bf16")
NCCL_START_ALIGNMENT_FACTOR = 2  # DeepSpeed aligns flat groups to 2 elements per rank (4 bytes of fp16)
DEFAULT_REDUCE_BUCKET_SIZE = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default
ADAM_STEP_BYTES = 4  # torch's AdamW keeps ``step`` as a float32 scalar tensor off CUDA-fused paths


@dataclass(frozen=True)
class Components:
    """Bytes of one kind of parameter (expert or non-expert) on one rank, per component."""

    params: int = 0
    grads: int = 0
    master: int = 0
    optimizer: int = 0
    buffers: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in COMPONENTS)

    def __add__(self, other: Components) -> Components:
        return Components(**{name: getattr(self, name) + getattr(other, name) for name in COMPONENTS})

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COMPONENTS}


@dataclass(frozen=True)
class StateBytes:
    """Model-state bytes on one rank: ``expert`` and ``dense`` (non-expert) parts, each per component."""

    expert: Components = field(default_factory=Components)
    dense: Components = field(default_factory=Components)

    @property
    def combined(self) -> Components:
        """Both kinds together, per component."""
        return self.expert + self.dense

    @property
    def total(self) -> int:
        return self.expert.total + self.dense.total

    def __getattr__(self, name: str) -> int:
        # ``state.params`` and the other component names give both kinds together.
        if name in COMPONENTS:
            return getattr(self.combined, name)
        raise AttributeError(name)

    def __add__(self, other: StateBytes) -> StateBytes:
        return StateBytes(self.expert + other.expert, self.dense + other.dense)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"expert": self.expert.as_dict(), "dense": self.dense.as_dict()}


def sum_state_bytes(parts: Iterable[StateBytes]) -> StateBytes:
    """The sum of several ranks' (or stages') :class:`StateBytes`."""
    total = StateBytes()
    for part in parts:
        total = total + part
    return total


# ------------------------------------------------------------------------------------------ prediction


def _zero_config(ds_config: dict[str, Any] | None) -> dict[str, Any]:
    return dict((ds_config or {}).get("zero_optimization", {}) or {})


def _param_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def aligned_numel(numel: int, alignment: int) -> int:
    """``numel`` rounded up to a multiple of ``alignment`` (integer arithmetic: exact at any size)."""
    return -(-numel // alignment) * alignment


def _group_layout(numels: list[int], param_alignment: int) -> tuple[list[int], int]:
    """Each parameter's offset in DeepSpeed's flat group (padding after every parameter but the last)."""
    offsets, current = [], 0
    for index, numel in enumerate(numels):
        offsets.append(current)
        current += numel
        if index < len(numels) - 1:
            current += (-current) % param_alignment
    return offsets, current


def _zero_partition_grads(
    numels: list[int], offsets: list[int], start: int, size: int, bucket: int
) -> tuple[int, int, int]:
    """ZeRO 1/2 gradient elements of one group's partition ``[start, start + size)``: (elements of the
    parameters it touches, copied whole into ZeRO's contiguous gradient buffer; zero-padding elements
    DeepSpeed allocates where no parameter covers the partition; elements of the other parameters larger
    than the bucket, whose gradients bypass the bucket and, under ZeRO-1, stay in their own storage until
    the end of backward)."""
    whole = covered = large = 0
    end = start + size
    for numel, offset in zip(numels, offsets):
        if start <= offset < end or offset < start < offset + numel:
            whole += numel
            covered += min(offset + numel, end) - max(offset, start)
        elif numel > bucket:
            large += numel
    return whole, size - covered, large


def predict_state_bytes(
    stage: StageModel,
    *,
    dp: int,
    ep: int,
    zero_stage: int,
    precision: str,
    weight_decay: float = 0.1,
    ds_config: dict[str, Any] | None = None,
    dp_rank: int = 0,
) -> StateBytes:
    """Model-state bytes on data-parallel rank ``dp_rank`` of ``stage`` (built with ``ep``), as DeepSpeed
    0.19.8 lays them out for the app's optimizer groups (``optimizer_param_groups``: decay / no-decay, the
    expert parameters in their own groups over ``dp / ep`` ranks).

    ``precision`` is the app's: parameters built fp32, cast to bf16 by DeepSpeed with ``bf16.enabled``.
    Which wrapper holds them is DeepSpeed's choice: ZeRO 1/2 its ZeRO optimizer; ZeRO 0 fp32 torch's
    AdamW on the parameters; ZeRO 0 bf16 the ``FP16_UnfusedOptimizer`` in bf16 (an fp32 master of every
    parameter) at PP = 1, and ``BF16_Optimizer`` (partitioned fp32 masters) in a pipeline. Gradients accumulate in the
    parameters' dtype (DeepSpeed's ``data_types.grad_accum_dtype`` default).
    """
    from ..integration.engine import optimizer_param_groups

    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage={zero_stage}: the planner models ZeRO 0, 1 and 2")
    if dp < 1 or ep < 1 or dp % ep:
        raise ValueError(f"dp={dp} must be a positive multiple of ep={ep}")
    if not 0 <= dp_rank < dp:
        raise ValueError(f"dp_rank={dp_rank} is outside 0..{dp - 1}")
    dtype = _param_dtype(precision)
    size = dtype_bytes(dtype)
    zero = _zero_config(ds_config)
    pipelined = stage.num_stages > 1
    bucket = int(zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET_SIZE))
    groups = [g for g in optimizer_param_groups(stage.module, weight_decay) if g["params"]]
    parts = {True: dict.fromkeys(COMPONENTS, 0), False: dict.fromkeys(COMPONENTS, 0)}
    for group in groups:
        expert = bool(group.get("moe", False))
        if expert != is_expert_param(group["params"][0]):
            raise ValueError(f"optimizer group {group.get('name')!r} mixes expert and non-expert parameters")
        out = parts[expert]
        numels = [p.numel() for p in group["params"]]
        count = dp // ep if expert else dp
        rank = dp_rank // ep if expert else dp_rank
        alignment = NCCL_START_ALIGNMENT_FACTOR * count
        if zero_stage == 0:
            total = sum(numels)
            if precision == "fp32":  # torch's AdamW on the parameters themselves
                out["params"] += total * size
                out["grads"] += total * size
                out["optimizer"] += 2 * total * 4 + ADAM_STEP_BYTES * len(numels)
            elif not pipelined:  # FP16_UnfusedOptimizer in bf16: an fp32 copy of every parameter
                out["params"] += total * size
                out["grads"] += total * size
                out["master"] += total * 4
                out["optimizer"] += 2 * total * 4 + ADAM_STEP_BYTES * len(numels)
            else:  # BF16_Optimizer: flat and aligned, fp32 master partition, flat gradient buffer
                flat = aligned_numel(total, alignment)
                partition = flat // count
                out["params"] += flat * size
                out["grads"] += (flat + total) * size  # its flat buffer, and the parameters' .grad it is read from
                out["master"] += partition * 4
                out["optimizer"] += 2 * partition * 4 + ADAM_STEP_BYTES
            continue
        param_alignment = 16 // math.gcd(16, size) if zero.get("parameter_alignment", False) else 1
        offsets, padded = _group_layout(numels, param_alignment)
        flat = aligned_numel(padded, alignment)
        partition = flat // count
        whole, zeros, large = _zero_partition_grads(numels, offsets, rank * partition, partition, bucket)
        out["params"] += flat * size
        if zero_stage == 2:  # ZeRO-2 frees the gradients of other ranks' parameters as it reduces them
            large = 0
        out["grads"] += (whole + zeros + large) * size
        out["master"] += partition * 4
        out["optimizer"] += 2 * partition * 4 + ADAM_STEP_BYTES
    if zero_stage in (1, 2):
        copies = 2 if zero.get("overlap_comm", False) else 1
        if pipelined and zero_stage == 1:
            copies += 1  # reduce_gradients(pipeline_parallel=True) adds one beside the backward hooks' own
        parts[False]["buffers"] += copies * bucket * size
    return StateBytes(Components(**parts[True]), Components(**parts[False]))


# ------------------------------------------------------------------------------------------ measurement


class _Tally:
    """Bytes of distinct storages, each storage counted once, split by parameter kind.

    A storage seen under several views (a flat buffer and the parameters viewing it) counts once, in
    full. A storage whose views are of both kinds (ZeRO's one gradient partition buffer for every group)
    is split by the bytes each kind's views cover; bytes no view covers go to the non-expert part.
    """

    def __init__(self) -> None:
        self.nbytes: dict[int, int] = {}
        self.kind_spans: dict[int, dict[bool, list[tuple[int, int]]]] = {}

    def add(self, tensor: torch.Tensor | None, expert: bool) -> None:
        if tensor is None or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            return
        key = storage.data_ptr()
        self.nbytes[key] = storage.nbytes()
        start = tensor.storage_offset() * tensor.element_size()
        span = (start, start + tensor.numel() * tensor.element_size())
        self.kind_spans.setdefault(key, {}).setdefault(expert, []).append(span)

    def keys(self) -> set[int]:
        return set(self.nbytes)

    def split(self, exclude: set[int] = frozenset()) -> tuple[int, int]:
        """(expert bytes, non-expert bytes) over the storages not in ``exclude``."""
        expert = dense = 0
        for key, nbytes in self.nbytes.items():
            if key in exclude:
                continue
            kinds = self.kind_spans[key]
            if len(kinds) == 1:
                if True in kinds:
                    expert += nbytes
                else:
                    dense += nbytes
                continue
            covered = _covered_bytes(kinds[True])
            expert += covered
            dense += nbytes - covered
        return expert, dense


def _covered_bytes(spans: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for lo, hi in sorted(spans):
        lo = max(lo, end)
        if hi > lo:
            total += hi - lo
            end = hi
    return total


def _optimizer_groups_kind(optimizer: Any) -> list[bool]:
    """Per param group of DeepSpeed's wrapped optimizer: whether it holds expert parameters."""
    return [bool(group.get("moe", False)) for group in optimizer.param_groups]


class StateProbe:
    """Watches a DeepSpeed engine for one step and reads its model-state bytes.

    Gradients and bucket buffers exist only between backward and the optimizer step, so the probe
    reads them there: under ZeRO 1/2 in the last act of DeepSpeed's backward epilogue (just before
    ``_release_ipg_buffers`` drops the bucket buffers: the gradients are then in their final storage,
    ZeRO-1's full gradients and ZeRO-2's partitions alike, and the parameters' ``.grad`` still view it),
    at ZeRO 0 on entry to the optimizer's ``step``. Parameters, master copies and optimizer states are
    read after the step (AdamW creates its states lazily in its first step).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.optimizer = engine.optimizer
        self.grads: tuple[int, int] | None = None
        self.buffers: tuple[int, int] = (0, 0)
        self._restore: list[tuple[Any, str, Any]] = []
        if hasattr(self.optimizer, "_release_ipg_buffers"):  # ZeRO 1/2
            self._wrap(self.optimizer, "_release_ipg_buffers", self._read_zero_backward)
        else:
            self._wrap(self.optimizer, "step", self._read_zero0_backward)

    def _wrap(self, obj: Any, name: str, before: Any) -> None:
        original = getattr(obj, name)

        def wrapped(*args, **kwargs):
            before()
            return original(*args, **kwargs)

        self._restore.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, wrapped)

    def close(self) -> None:
        """Take the probe's hooks off the engine."""
        for obj, name, previous in self._restore:
            if previous is None:
                delattr(obj, name)
            else:
                setattr(obj, name, previous)
        self._restore.clear()

    def _param_grads(self, tally: _Tally) -> None:
        for param in self.engine.module.parameters():
            expert = is_expert_param(param)
            tally.add(param.grad, expert)
            tally.add(getattr(param, "grad_accum", None), expert)

    def _read_zero_backward(self) -> None:
        opt = self.optimizer
        if not opt.ready_for_gradients:  # the release at construction, before any backward
            return
        kinds = _optimizer_groups_kind(opt)
        buffers = _Tally()
        for bucket in opt.ipg_buckets.values():
            for buffer in bucket.buffer:
                buffers.add(buffer, False)
        grads = _Tally()
        self._param_grads(grads)
        for i, expert in enumerate(kinds):
            for tensor in opt.averaged_gradients.get(i) or []:
                grads.add(tensor, expert)
            for tensor in (opt.all_grad_tensors.get(i) or []) if hasattr(opt, "all_grad_tensors") else []:
                grads.add(tensor, expert)
            grads.add(opt.single_partition_of_fp32_groups[i].grad, expert)
        self.grads = grads.split(exclude=buffers.keys())
        self.buffers = buffers.split()

    def _read_zero0_backward(self) -> None:
        opt = self.optimizer
        grads = _Tally()
        self._param_grads(grads)
        if hasattr(opt, "fp32_groups_gradients_flat"):  # BF16_Optimizer
            for expert, flat in zip(_optimizer_groups_kind(opt), opt.fp32_groups_gradients_flat):
                grads.add(flat, expert)
        self.grads = grads.split()

    def read(self) -> StateBytes:
        """The bytes after the watched step (call after one ``engine.step()`` / ``train_batch``)."""
        if self.grads is None:
            raise RuntimeError("the probe saw no backward: run one training step before reading it")
        opt = self.optimizer
        params = _Tally()
        for param in self.engine.module.parameters():
            params.add(param.data, is_expert_param(param))
        master, states = _Tally(), _Tally()
        inner = getattr(opt, "optimizer", opt)
        kinds = _optimizer_groups_kind(inner)
        flat_masters = None
        for name in (
            "single_partition_of_fp32_groups",
            "fp32_groups_flat_partition",
            "fp32_groups_flat",
            "fp32_groups",
        ):
            # ZeRO 1/2, BF16_Optimizer, FP16_Optimizer (flat), FP16_UnfusedOptimizer (one copy per parameter)
            flat_masters = getattr(opt, name, None)
            if flat_masters is not None:
                break
        for expert, masters in zip(kinds, flat_masters or []):
            for tensor in masters if isinstance(masters, list) else [masters]:
                master.add(tensor, expert)
        for expert, group in zip(kinds, inner.param_groups):
            for param in group["params"]:
                for value in inner.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor):
                        states.add(value, expert)
        (pe, pd), (me, md), (oe, od) = params.split(), master.split(), states.split()
        (ge, gd), (be, bd) = self.grads, self.buffers
        return StateBytes(Components(pe, ge, me, oe, be), Components(pd, gd, md, od, bd))


def measure_state_bytes(engine: Any, step: Any = None) -> StateBytes:
    """Model-state bytes on this rank of a real DeepSpeed engine (a plain engine or a ``PipelineEngine``).

    ``step()`` runs one training step (``engine.train_batch(...)``, or forward, ``engine.backward`` and
    ``engine.step()``); the gradients and bucket buffers are read inside it (see :class:`StateProbe`),
    the rest after it. Without ``step``, call :class:`StateProbe` around the step yourself.
    """
    if step is None:
        raise TypeError("measure_state_bytes needs step: a callable running one training step of engine")
    probe = StateProbe(engine)
    try:
        step()
    finally:
        probe.close()
    return probe.read()
