"""Process topology: pure layout arithmetic, validation messages, and the groups on real processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_parallel.integration.parallel import ParallelConfigError, ParallelLayout, initialize_parallel
from tests.dist_utils import run_distributed


def test_layout_groups_pp2_dp4_ep2():
    layout = ParallelLayout(world_size=8, pipeline_parallel_size=2, expert_parallel_size=2)
    assert layout.data_parallel_size == 4 and layout.expert_data_parallel_size == 2
    assert layout.data_parallel_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.pipeline_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.expert_parallel_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.expert_data_parallel_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert [layout.ep_rank_of(r) for r in range(8)] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert [layout.stage_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_layout_matches_deepspeed_pipeline_topology():
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    layout = ParallelLayout(world_size=8, pipeline_parallel_size=2, expert_parallel_size=4)
    topo = PipeDataParallelTopology(num_pp=2, num_dp=4)
    for rank in range(8):
        coord = topo.get_coord(rank)
        assert (coord.pipe, coord.data) == (layout.stage_of(rank), layout.dp_rank_of(rank))


@pytest.mark.parametrize(
    "world,pp,ep,experts,message",
    [
        (6, 4, 1, None, "world size 6 is not divisible by pipeline stages parallel.pp=4"),
        (8, 2, 3, None, r"data-parallel size 4 .* not divisible by parallel.ep=3: choose ep among \[1, 2, 4\]"),
        (8, 1, 4, 6, r"moe.num_experts=6 is not divisible by parallel.ep=4: choose ep among \[1, 2\]"),
        (4, 0, 1, None, "parallel.pp=0 must be a positive integer"),
    ],
)
def test_bad_layouts_name_numbers_and_fix(world, pp, ep, experts, message):
    with pytest.raises(ParallelConfigError, match=message):
        ParallelLayout(world, pp, ep, experts)


def _groups_work(rank, world):
    from deepspeed.utils import groups

    state = initialize_parallel(pipeline_parallel_size=2, expert_parallel_size=2, num_experts=4)
    assert dist.get_world_size(state.ep_group) == 2 and dist.get_world_size(state.dp_group) == 2
    assert dist.get_world_size(state.expert_dp_group) == 1 and dist.get_world_size(state.pp_group) == 2
    assert groups._get_expert_parallel_group("ep_size_2") is state.ep_group
    assert groups._get_expert_data_parallel_group("ep_size_2") is state.expert_dp_group
    # The EP group really is {stage's ranks}: an all-reduce over it sums the two ranks of our stage.
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=state.ep_group)
    assert t.item() == {0: 1.0, 1: 1.0, 2: 5.0, 3: 5.0}[rank]


def test_groups_on_four_processes():
    run_distributed(_groups_work, 4, timeout=120)


def _deepspeed_shm_files_are_unlinked(rank: int, world_size: int) -> None:
    import os

    import deepspeed
    import deepspeed.comm as ds_comm

    from moe_parallel.integration.deepspeed import shm_allreduce_buffer

    os.environ["LOCAL_SIZE"] = str(world_size)  # as the deepspeed launcher sets it: every rank on this host
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    own = shm_allreduce_buffer(rank)
    assert os.path.exists(own), f"DeepSpeed's CPU communication made no {own}: the test would prove nothing"
    initialize_parallel(1, world_size, 2 * world_size)
    assert not os.path.exists(own)
    for step in range(3):  # DeepSpeed's shared-memory all-reduce still works through the mappings
        t = torch.full((1000,), float(rank + step))
        ds_comm.inference_all_reduce(t)
        assert torch.equal(t, torch.full((1000,), float(sum(range(world_size)) + world_size * step)))


@pytest.mark.parametrize("world_size", [1, 2])
def test_deepspeed_shared_memory_files_do_not_outlive_the_run(world_size: int):
    """DeepSpeed's CPU all-reduce leaves a ~70 MB /dev/shm file per rank; initialize_parallel removes them."""
    run_distributed(_deepspeed_shm_files_are_unlinked, world_size)
