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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .deepspeed_integration import expert_group_name, register_expert_groups

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
                f"launch a multiple of {pp} processes or choose pp among {_divisors(world)}"
            )
        dp = world // pp
        if dp % ep:
            raise ParallelConfigError(
                f"data-parallel size {dp} (= world {world} / pp {pp}) is not divisible by "
                f"parallel.ep={ep}: choose ep among {_divisors(dp)}"
            )
        if self.num_experts is not None and self.num_experts % ep:
            raise ParallelConfigError(
                f"moe.num_experts={self.num_experts} is not divisible by parallel.ep={ep}: "
                f"choose ep among {[d for d in _divisors(dp) if self.num_experts % d == 0]}"
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


def _divisors(n: int) -> list[int]:
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


def _new_groups(all_ranks: list[list[int]], rank: int) -> ProcessGroup:
    """Create every group (all ranks must call ``new_group`` for each) and return the one holding ``rank``."""
    mine = None
    for ranks in all_ranks:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    assert mine is not None
    return mine


def initialize_parallel(
    pipeline_parallel_size: int = 1, expert_parallel_size: int = 1, num_experts: int | None = None
) -> ParallelState:
    """Validate the layout, build the DP / PP / EP / expert-DP groups and register them with DeepSpeed.

    Requires ``torch.distributed`` to be initialised (any backend). Every rank must call it.
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel() needs torch.distributed: call deepspeed.init_distributed() first")
    layout = ParallelLayout(dist.get_world_size(), pipeline_parallel_size, expert_parallel_size, num_experts)
    rank = dist.get_rank()
    state = ParallelState(
        layout=layout,
        rank=rank,
        dp_group=_new_groups(layout.data_parallel_groups(), rank),
        pp_group=_new_groups(layout.pipeline_groups(), rank),
        ep_group=_new_groups(layout.expert_parallel_groups(), rank),
        expert_dp_group=_new_groups(layout.expert_data_parallel_groups(), rank),
    )
    _register_with_deepspeed(state)
    return state


def _register_with_deepspeed(state: ParallelState) -> None:
    """File our EP and expert-DP groups in ``deepspeed.utils.groups`` so DeepSpeed reduces experts right."""
    layout = state.layout
    ep_ranks = next(r for r in layout.expert_parallel_groups() if state.rank in r)
    edp_ranks = next(r for r in layout.expert_data_parallel_groups() if state.rank in r)
    register_expert_groups(layout.expert_parallel_size, state.ep_group, ep_ranks, state.expert_dp_group, edp_ranks)
