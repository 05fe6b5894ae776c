"""Process topology: pipeline × data parallelism, with experts split over EP ranks inside DP.

World = PP × DP, rank = stage · DP + dp_rank (DeepSpeed's ``PipeDataParallelTopology`` order).
Inside a stage the DP ranks form DP/EP expert-parallel groups of EP consecutive ranks; ranks with
the same position in their EP group form an expert-data-parallel group (size DP/EP):

    PP=2, DP=4, EP=2      stage 0: ranks 0 1 2 3      stage 1: ranks 4 5 6 7
    EP groups:            [0 1] [2 3]                  [4 5] [6 7]
    expert-DP groups:     [0 2] [1 3]                  [4 6] [5 7]

Replicated parameters reduce over DP, expert parameters over expert-DP. The groups are built once
and registered with DeepSpeed's ``deepspeed.utils.groups`` under ``ep_size_{EP}``, so its engine and
ZeRO reduce each parameter over its own group.

Every group carries a timeout (by default the world group's, e.g. ``init_process_group(timeout=...)``):
a collective that a stalled rank never joins fails after it instead of waiting for the backend's
default (30 minutes on gloo, 10 on NCCL). :func:`apply_timeout_to_all_groups` extends it to groups
that others (DeepSpeed's pipeline grid) create, and :func:`describe_collective_timeout` turns the
backend's timeout error into a message naming the group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType

import torch
import torch.distributed as dist

from .deepspeed import expert_group_name, register_expert_groups, unlink_shm_allreduce_buffers

ProcessGroup = dist.ProcessGroup


class ParallelConfigError(ValueError):
    """The parallel layout cannot be built; the message names the numbers and the fix."""


@dataclass(frozen=True)
class ParallelLayout:
    """Pure arithmetic of a (world, PP, EP) layout; validated before any process group exists."""

    world_size: int
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    num_experts: int | None = None

    def __post_init__(self) -> None:
        world, pp, ep = self.world_size, self.pipeline_parallel_size, self.expert_parallel_size
        for name, value in (("world_size", world), ("parallel.pp", pp), ("parallel.ep", ep)):
            if not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"{name}={value!r} must be a positive integer")
        if world % pp:
            raise ParallelConfigError(
                f"world size {world} is not divisible by pipeline stages parallel.pp={pp}: "
                f"launch a multiple of {pp} processes or choose pp among {divisors(world)}"
            )
        dp = world // pp
        if dp % ep:
            raise ParallelConfigError(
                f"data-parallel size {dp} (= world {world} / pp {pp}) is not divisible by "
                f"parallel.ep={ep}: choose ep among {divisors(dp)}"
            )
        if self.num_experts is not None and self.num_experts % ep:
            raise ParallelConfigError(
                f"moe.num_experts={self.num_experts} is not divisible by parallel.ep={ep}: "
                f"choose ep among {[d for d in divisors(dp) if self.num_experts % d == 0]}"
            )

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.pipeline_parallel_size

    @property
    def expert_data_parallel_size(self) -> int:
        return self.data_parallel_size // self.expert_parallel_size

    def stage_of(self, rank: int) -> int:
        return rank // self.data_parallel_size

    def dp_rank_of(self, rank: int) -> int:
        return rank % self.data_parallel_size

    def ep_rank_of(self, rank: int) -> int:
        return self.dp_rank_of(rank) % self.expert_parallel_size

    def data_parallel_groups(self) -> list[list[int]]:
        dp = self.data_parallel_size
        return [list(range(s * dp, (s + 1) * dp)) for s in range(self.pipeline_parallel_size)]

    def pipeline_groups(self) -> list[list[int]]:
        dp = self.data_parallel_size
        return [list(range(d, self.world_size, dp)) for d in range(dp)]

    def expert_parallel_groups(self) -> list[list[int]]:
        ep = self.expert_parallel_size
        return [dp[i : i + ep] for dp in self.data_parallel_groups() for i in range(0, len(dp), ep)]

    def expert_data_parallel_groups(self) -> list[list[int]]:
        ep = self.expert_parallel_size
        return [dp[i::ep] for dp in self.data_parallel_groups() for i in range(ep)]


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending: the sizes ``n`` ranks split into evenly."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelState:
    """This rank's place in the layout and its process groups."""

    layout: ParallelLayout
    rank: int
    dp_group: ProcessGroup
    ep_group: ProcessGroup
    expert_dp_group: ProcessGroup
    pp_group: ProcessGroup

    @property
    def stage_id(self) -> int:
        return self.layout.stage_of(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank_of(self.rank)

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank_of(self.rank)

    @property
    def expert_group_name(self) -> str:
        return expert_group_name(self.layout.expert_parallel_size)

    def deepspeed_topology(self):
        """DeepSpeed's pipeline topology for this layout (for ``PipelineModule(topology=...)``)."""
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        layout = self.layout
        return PipeDataParallelTopology(num_pp=layout.pipeline_parallel_size, num_dp=layout.data_parallel_size)


# What each of our groups is for, as named in timeout messages (``ProcessGroup.group_desc``).
GROUP_PURPOSES = {
    "moe_dp": "data-parallel (loss and MoE statistics, replicated gradients)",
    "moe_pp": "pipeline (MoE statistics across stages)",
    "moe_ep": "expert-parallel (the MoE token all-to-all)",
    "moe_expert_dp": "expert-data-parallel (expert gradients)",
}


def _new_groups(all_ranks: list[list[int]], rank: int, timeout: timedelta, desc: str) -> ProcessGroup:
    """Create every group (all ranks must call ``new_group`` for each) and return the one holding ``rank``."""
    mine = None
    for ranks in all_ranks:
        group = dist.new_group(ranks, timeout=timeout, group_desc=desc)
        if rank in ranks:
            mine = group
    assert mine is not None
    return mine


def group_timeout(group: ProcessGroup | None = None) -> timedelta | None:
    """The timeout ``group`` (default: the world group) was created with, where the backend tells it."""
    group = group if group is not None else dist.distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except Exception:  # no backend for this device, or a torch without the attribute
            continue
    return None


def _as_timedelta(timeout: timedelta | float | None) -> timedelta:
    if timeout is None:
        timeout = group_timeout() or dist.default_pg_timeout
    if not isinstance(timeout, timedelta):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ParallelConfigError(f"timeout={timeout!r} is invalid: give seconds > 0 or a timedelta")
        timeout = timedelta(seconds=timeout)
    return timeout


def initialize_parallel(
    pipeline_parallel_size: int = 1,
    expert_parallel_size: int = 1,
    num_experts: int | None = None,
    *,
    timeout: timedelta | float | None = None,
) -> ParallelState:
    """Validate the layout, build the DP / PP / EP / expert-DP groups and register them with DeepSpeed.

    Requires ``torch.distributed`` to be initialised (any backend). Every rank must call it.
    ``timeout`` (seconds or a timedelta; default: the world group's) bounds every collective on
    these groups: one that a stalled rank never joins fails after it rather than hanging.
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel() needs torch.distributed: call deepspeed.init_distributed() first")
    layout = ParallelLayout(dist.get_world_size(), pipeline_parallel_size, expert_parallel_size, num_experts)
    wait = _as_timedelta(timeout)
    rank = dist.get_rank()
    state = ParallelState(
        layout=layout,
        rank=rank,
        dp_group=_new_groups(layout.data_parallel_groups(), rank, wait, "moe_dp"),
        pp_group=_new_groups(layout.pipeline_groups(), rank, wait, "moe_pp"),
        ep_group=_new_groups(layout.expert_parallel_groups(), rank, wait, "moe_ep"),
        expert_dp_group=_new_groups(layout.expert_data_parallel_groups(), rank, wait, "moe_expert_dp"),
    )
    _register_with_deepspeed(state)
    unlink_shm_allreduce_buffers()
    return state


def apply_timeout_to_all_groups(timeout: timedelta | float | None = None) -> int:
    """Give ``timeout`` to every process group this rank belongs to, also those created without one
    (DeepSpeed's pipeline grid and data-parallel groups). Returns how many groups it set.

    Uses torch's ``_set_pg_timeout``; on a torch without it nothing changes (returns 0).
    """
    wait = _as_timedelta(timeout)
    c10d = dist.distributed_c10d
    if not hasattr(c10d, "_set_pg_timeout"):
        return 0
    count = 0
    for group in list(c10d._world.pg_map):
        if c10d._rank_not_in_group(group):
            continue
        c10d._set_pg_timeout(wait, group)
        count += 1
    return count


_TIMEOUT_RE = re.compile(r"timed? ?out|timeout|deadline exceeded", re.IGNORECASE)


def _describe_group(group: ProcessGroup | None) -> str:
    if group is None or group == dist.GroupMember.WORLD:
        return "the world group (all ranks)"
    try:
        ranks = dist.get_process_group_ranks(group)
    except Exception:
        ranks = "?"
    desc = getattr(group, "group_desc", "") or ""
    purpose = GROUP_PURPOSES.get(desc)
    if purpose:
        return f"the {purpose} group {desc!r} (ranks {ranks})"
    return f"a process group created outside moe_parallel ({desc or 'no name'}, ranks {ranks})"


def _failing_group(tb: TracebackType | None) -> tuple[bool, ProcessGroup | None]:
    """The ``group`` argument of the innermost torch.distributed call in a traceback: (found, group)."""
    found, group = False, None
    while tb is not None:
        local = tb.tb_frame.f_locals
        if "group" in local and (local["group"] is None or isinstance(local["group"], ProcessGroup)):
            found, group = True, local["group"]
        tb = tb.tb_next
    return found, group


def describe_collective_timeout(exc: BaseException, timeout_s: float | None = None) -> str | None:
    """A message for a collective that timed out (None if ``exc`` is not a timeout): which group, and
    what to check. Reads the group from the failing call's frame in the traceback."""
    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, RuntimeError) or not _TIMEOUT_RE.search(str(exc)):
        return None
    found, group = _failing_group(exc.__traceback__)
    where = _describe_group(group) if found else "a process group"
    limit = f"parallel.timeout_s={timeout_s:g} s" if timeout_s is not None else "its timeout"
    rank = dist.get_rank() if dist.is_initialized() else 0
    return (
        f"rank {rank}: a collective on {where} did not complete within {limit}: another rank of that group "
        "stopped taking part. Check the other ranks' logs for an error above this one; a rank that is alive but "
        "stuck (a stalled or SIGSTOPped process, a hung file-system read, a wedged GPU: `py-spy dump --pid <pid>` "
        "shows where); the network between the nodes (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME). If a step "
        f"legitimately takes longer (a large checkpoint save), raise parallel.timeout_s. ({text.strip()[:300]})"
    )


def _register_with_deepspeed(state: ParallelState) -> None:
    """File our EP and expert-DP groups in ``deepspeed.utils.groups`` so DeepSpeed reduces experts right."""
    layout = state.layout
    ep_ranks = next(r for r in layout.expert_parallel_groups() if state.rank in r)
    edp_ranks = next(r for r in layout.expert_data_parallel_groups() if state.rank in r)
    register_expert_groups(layout.expert_parallel_size, state.ep_group, ep_ranks, state.expert_dp_group, edp_ranks)
