"""Health checks of a run: expert-collapse detection, the first non-finite layer, process-group timeouts."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from moe_parallel.integration.parallel import (
    apply_timeout_to_all_groups,
    describe_collective_timeout,
    group_timeout,
    initialize_parallel,
)
from moe_parallel.models import GPT, GPTConfig
from moe_parallel.training.metrics import (
    CollapseThresholds,
    ExpertCollapseMonitor,
    MoEMetricsError,
    NonFiniteProbe,
    layer_key,
)
from tests.dist_utils import free_port, run_distributed

# ---------------------------------------------------------------- expert collapse


def _metrics(loads: dict[int, np.ndarray], entropy: float = 1.0) -> dict:
    out = {}
    for number, load in loads.items():
        out[layer_key(number, "tokens_per_expert")] = np.asarray(load, dtype=np.int64)
        out[layer_key(number, "router_entropy")] = entropy
    return out


def _balanced(rng: np.random.Generator, num_experts: int, top_k: int, tokens: int) -> np.ndarray:
    """Top-k routing of `tokens` tokens over uniformly random distinct experts."""
    load = np.zeros(num_experts, dtype=np.int64)
    for _ in range(tokens):
        load[rng.choice(num_experts, size=top_k, replace=False)] += 1
    return load


@pytest.mark.parametrize("seed", range(5))
def test_healthy_routing_is_never_reported(seed):
    rng = np.random.default_rng(seed)
    num_experts = int(rng.integers(4, 65))
    top_k = int(rng.integers(1, min(8, num_experts) + 1))
    monitor = ExpertCollapseMonitor(CollapseThresholds(window=2))
    for step in range(20):
        load = _balanced(rng, num_experts, top_k, tokens=64 * num_experts)
        assert monitor.update(step, _metrics({0: load, 3: load[::-1]}, entropy=float(np.log(num_experts)))) == []


@pytest.mark.parametrize("seed", range(5))
def test_a_collapsed_layer_is_reported_once_per_episode(seed):
    rng = np.random.default_rng(seed)
    num_experts = int(rng.integers(8, 65))
    top_k = int(rng.integers(1, 3))
    window = int(rng.integers(1, 6))
    monitor = ExpertCollapseMonitor(CollapseThresholds(window=window))
    hot = sorted(rng.choice(num_experts, size=top_k, replace=False).tolist())
    collapsed = np.zeros(num_experts, dtype=np.int64)
    collapsed[hot] = 1000  # every token goes to the same top_k experts
    healthy = _balanced(rng, num_experts, top_k, tokens=32 * num_experts)
    reports = [monitor.update(s, _metrics({2: collapsed, 5: healthy})) for s in range(3 * window)]
    fired = [(s, r) for s, rs in enumerate(reports) for r in rs]
    assert len(fired) == 1  # one warning, not one per step; the healthy layer never
    step, report = fired[0]
    assert step == window - 1 and report.layer_number == 2
    assert report.overloaded_experts == hot
    assert report.max_load_ratio == pytest.approx(num_experts / top_k)
    assert sorted(set(report.starved_experts) | set(hot)) == list(range(num_experts))
    message = report.message(window)
    assert "MoE layer 2" in message and str(hot) in message and f"{num_experts / top_k:.2f}x" in message
    # It recovers, then collapses again: a new episode, a new report.
    monitor.update(100, _metrics({2: healthy}))
    again = [monitor.update(101 + s, _metrics({2: collapsed})) for s in range(window)]
    assert sum(len(r) for r in again) == 1


def test_near_zero_router_entropy_counts_as_collapse():
    monitor = ExpertCollapseMonitor(CollapseThresholds(window=1, min_entropy=0.05))
    (report,) = monitor.update(7, _metrics({1: np.full(8, 100)}, entropy=0.001))
    assert report.reasons and "router entropy 0.0010 nats" in report.reasons[0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"min_load_fraction": 1.0}, r"min_load_fraction=1.0 is invalid: must be in \[0, 1\)"),
        ({"max_load_ratio": 0.5}, "max_load_ratio=0.5 is invalid: must be > 1"),
        ({"min_entropy": -0.1}, "min_entropy=-0.1 is invalid"),
        ({"window": 0}, "window=0 is invalid"),
    ],
)
def test_collapse_thresholds_are_validated(kwargs, message):
    with pytest.raises(MoEMetricsError, match=message):
        CollapseThresholds(**kwargs)


# ---------------------------------------------------------------- the first non-finite layer


def test_probe_names_the_first_layer_whose_output_is_not_finite():
    cfg = GPTConfig(vocab_size=32, seq_len=8, num_layers=3, hidden_size=16, num_heads=2, ffn_hidden_size=24,
                    moe_every=1, moe={"num_experts": 4, "top_k": 2}, init_std=0.1)  # fmt: skip
    model = GPT(cfg)
    probe = NonFiniteProbe(model)
    tokens = torch.randint(0, 32, (2, 8))
    probe.start_step()
    assert torch.isfinite(model(tokens)).all() and probe.first_non_finite() is None
    with torch.no_grad():
        model.blocks[1].ffn.experts.w1.fill_(math.inf)  # every expert of MoE layer 1
    probe.start_step()
    model(tokens).sum().backward()
    first = probe.first_non_finite()  # the innermost hooked module that produced it: the experts of layer 1
    assert first is not None and first.startswith("blocks.1.ffn") and "layer 1)" in first, first
    probe.remove()
    probe.start_step()
    model(tokens)
    assert probe.first_non_finite() is None  # no hooks left


# ---------------------------------------------------------------- process-group timeouts


def _groups_carry_the_timeout(rank: int, world: int) -> None:
    inherited = initialize_parallel(1, 2, 4)
    assert group_timeout(inherited.ep_group) == timedelta(seconds=60)  # the world group's (dist_utils)
    state = initialize_parallel(1, 2, 4, timeout=7)
    for group in (state.dp_group, state.ep_group, state.expert_dp_group, state.pp_group):
        assert group_timeout(group) == timedelta(seconds=7)
    foreign = dist.new_group([0, 1])  # as DeepSpeed's pipeline grid creates them: torch's default timeout
    assert group_timeout(foreign) == timedelta(minutes=30)
    assert apply_timeout_to_all_groups(5) >= 5
    assert group_timeout(foreign) == timedelta(seconds=5) == group_timeout(state.ep_group)


def test_every_group_carries_the_timeout():
    run_distributed(_groups_carry_the_timeout, 2, timeout=120)


def _stall(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    state = initialize_parallel(1, 2, 4, timeout=3)
    if rank == 1:
        time.sleep(30)  # stalled: never joins the all-to-all (rank 0 kills it when done)
        return
    start = time.monotonic()
    try:
        out = torch.empty(2)
        dist.all_to_all_single(out, torch.ones(2), group=state.ep_group)
        queue.put(("no error", 0.0))
    except RuntimeError as exc:
        queue.put((describe_collective_timeout(exc, 3), time.monotonic() - start))
    queue.close()
    queue.join_thread()  # flushed before leaving
    os._exit(0)  # the group is broken now: no teardown


def test_a_stalled_rank_is_reported_with_its_group():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_stall, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        message, waited = queue.get(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert message is not None and 3 * 0.9 <= waited < 3 + 30
    assert "the expert-parallel (the MoE token all-to-all) group 'moe_ep' (ranks [0, 1])" in message
    assert "parallel.timeout_s=3 s" in message and "py-spy dump" in message


def test_other_errors_are_not_called_timeouts():
    assert describe_collective_timeout(RuntimeError("Connection closed by peer")) is None
    assert describe_collective_timeout(ValueError("timed out")) is None
