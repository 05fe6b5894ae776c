"""What a layer step costs a GPU cluster, counted exactly: collectives, bytes sent, host syncs.

At EP > 1 one training step of one layer (forward and backward) makes 5 collectives (the counts
exchange, dispatch and combine, their backwards) and 1 host sync (the split sizes), for every router
option, capacity or dropless, top-1 to top-k, with or without a shared expert, with the combine
weights on the experts' outputs or their inputs (``input_weighted``); the combine weights never
travel. At EP = 1 on the grouped-GEMM path it makes no host sync at all. The drop-in makes at
most 5 collectives and one host sync. Configs are random draws over the router options.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from moe_parallel import MoEConfig, MoELayer
from moe_parallel.core import comm
from moe_parallel.core.counters import count_collectives, count_host_syncs
from tests.dist_utils import run_distributed


def random_config(rng: random.Random, hidden: int = 16) -> dict:
    """A random draw over the router, capacity and expert options (EP-compatible: 4 or 8 experts)."""
    num_experts = rng.choice([4, 8])
    top_k = rng.randint(1, min(4, num_experts))
    cfg = dict(
        hidden_size=hidden,
        ffn_hidden_size=rng.choice([8, 12, 20]),
        num_experts=num_experts,
        top_k=top_k,
        score_func=rng.choice(["softmax", "sigmoid"]),
        capacity_factor=rng.choice([None, 0.5, 1.25, 2.0]),
        drop_policy=rng.choice(["position", "probs"]),
        activation=rng.choice(["gelu", "swiglu", "relu", "silu"]),
        expert_bias=rng.random() < 0.3,
        router_noise=rng.choice(["none", "none", "jitter", "gumbel"]),
        z_loss_coeff=rng.choice([0.0, 1e-3]),
        expert_bias_update_rate=rng.choice([0.0, 0.0, 1e-3]),
        routed_scaling_factor=rng.choice([1.0, 2.5]),
        min_capacity=rng.choice([0, 4]),
    )
    if cfg["score_func"] == "softmax" and rng.random() < 0.3:
        cfg["score_after_topk"] = True
    if rng.random() < 0.3 and top_k <= num_experts // 2:
        cfg.update(num_groups=2, topk_groups=1)
    if rng.random() < 0.5:
        cfg.update(shared_expert_ffn_hidden_size=8, shared_expert_gate=rng.random() < 0.5)
    # The options of DeepSeek-V2, Llama 4 and GPT-OSS: no collective, byte or host sync of their own.
    cfg.update(router_bias=rng.random() < 0.4, input_weighted=rng.random() < 0.4)
    if cfg.get("num_groups", 1) > 1:
        cfg["group_score"] = rng.choice(["top2_sum", "max"])
    if rng.random() < 0.3:
        cfg.update(activation="clamped_swiglu", swiglu_limit=rng.choice([0.5, 7.0]))
    return cfg


def _one_step(layer, x_TD: torch.Tensor) -> None:
    x = x_TD.clone().requires_grad_()  # inside a model the input requires grad
    y = layer(x)
    y.backward(torch.ones_like(y))


def _counts_at_ep2(rank: int, world: int, seeds: list[int]) -> None:
    for seed in seeds:
        rng = random.Random(seed)
        cfg = MoEConfig(**random_config(rng))
        layer = MoELayer(cfg, ep_group=dist.group.WORLD).train()
        torch.manual_seed(seed * 10 + rank)
        tokens = rng.randint(1, 48) + 7 * rank  # ranks hold different token counts
        x_TD = torch.randn(tokens, cfg.hidden_size)
        _one_step(layer, x_TD)  # warm-up: the first step resolves the expert path
        with count_collectives() as coll, count_host_syncs() as syncs:
            _one_step(layer, x_TD)
        assert coll.count == 5, (seed, cfg, coll.calls)
        assert coll.calls == ["all_to_all_single"] * 5, (seed, coll.calls)
        assert syncs.count == 1, (seed, cfg, syncs.reads)

        # Bytes: the counts (one int64 per local expert plus the flag), then only token rows, each
        # way and back in backward: no combine weights travel.
        e = cfg.num_experts // world
        with torch.no_grad():
            _, _, plan = layer.route_and_plan(x_TD) if cfg.router_noise == "none" else (None, None, None)
        if plan is not None:
            kept_Re = plan.tokens_per_expert_E.view(world, e).sum(1)
            to_other = int(kept_Re.sum() - kept_Re[rank])
            sent = torch.tensor([to_other])
            from_other = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
            dist.all_gather(from_other, sent)
            received = int(sum(t for r, t in enumerate(from_other) if r != rank))
            row = cfg.hidden_size * 4
            # Forward: counts, tokens out, outputs back; backward: output grads out, input grads back.
            assert coll.bytes_sent == [(e + 1) * 8, to_other * row, received * row, to_other * row, received * row], (
                seed,
                coll.bytes_sent,
            )


@pytest.mark.parametrize(
    "seeds",
    [list(range(0, 8)), pytest.param(list(range(8, 24)), marks=pytest.mark.slow)],
    ids=["draws0-7", "draws8-23"],
)
def test_ep2_step_makes_five_collectives_and_one_host_sync(seeds):
    run_distributed(_counts_at_ep2, 2, seeds, timeout=240)


@pytest.mark.parametrize("seed", [*range(6), *(pytest.param(s, marks=pytest.mark.slow) for s in range(6, 18))])
def test_ep1_grouped_gemm_step_makes_no_host_sync(seed):
    rng = random.Random(1000 + seed)
    cfg = MoEConfig(**random_config(rng), expert_gemm="grouped")
    layer = MoELayer(cfg).train()
    x_TD = torch.randn(rng.randint(1, 40), cfg.hidden_size)
    _one_step(layer, x_TD)
    with count_collectives() as coll, count_host_syncs() as syncs:
        _one_step(layer, x_TD)
    assert syncs.count == 0, (cfg, syncs.reads)
    assert coll.count == 0


def test_ep1_cpu_paths_read_the_counts_once():
    """The loop and padded paths need the row counts on the host: one read, by the dispatcher."""
    for gemm in ("loop", "padded"):
        cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, expert_gemm=gemm)
        layer = MoELayer(cfg).train()
        x_TD = torch.randn(20, 16)
        with count_host_syncs() as syncs:
            _one_step(layer, x_TD)
        assert syncs.reads == ["tolist"], gemm


def _shared_expert_runs_while_tokens_travel(rank: int, world: int) -> None:
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, shared_expert_ffn_hidden_size=8)
    layer = MoELayer(cfg, ep_group=dist.group.WORLD).train()
    events: list[str] = []
    start, wait = comm.start_all_to_all, comm.wait_all_to_all

    def recording_start(*args, **kwargs):
        events.append("dispatch issued")
        return start(*args, **kwargs)

    def recording_wait(*args, **kwargs):
        events.append("dispatch waited")
        return wait(*args, **kwargs)

    layer.shared_expert.register_forward_hook(lambda *_: events.append("shared expert"))
    import moe_parallel.core.dispatcher as dispatcher

    dispatcher.start_all_to_all, dispatcher.wait_all_to_all = recording_start, recording_wait
    try:
        _one_step(layer, torch.randn(12, 16))
    finally:
        dispatcher.start_all_to_all, dispatcher.wait_all_to_all = start, wait
    assert events == ["dispatch issued", "shared expert", "dispatch waited"]


def test_shared_expert_overlaps_the_dispatch_all_to_all():
    """The shared expert is computed between issuing the token all-to-all and waiting for it; its
    numbers are the oracle's (tests/test_expert_parallel.py runs shared-expert EP cases)."""
    run_distributed(_shared_expert_runs_while_tokens_travel, 2, timeout=120)


def _drop_in_counts(rank: int, world: int) -> None:
    import deepspeed.comm

    from moe_parallel.integration.compat import MoE

    deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    for k, factor, used in ((1, 1.0, True), (2, 1.25, False), (4, 2.0, False)):
        expert = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        layer = MoE(hidden_size=16, expert=expert, num_experts=4, ep_size=2, k=k, capacity_factor=factor).train()
        x_TD = torch.randn(24, 16)
        used_T = (torch.arange(24) % 3 != 0).long() if used else None

        def step(layer=layer, x_TD=x_TD, used_T=used_T):
            x = x_TD.clone().requires_grad_()
            out, l_aux, _ = layer(x, used_token=used_T)
            (out.sum() + l_aux).backward()

        step()
        with count_collectives() as coll, count_host_syncs() as syncs:
            step()
        assert coll.count <= 5, (k, coll.calls)
        assert syncs.count <= 1, (k, syncs.reads)


def test_drop_in_makes_at_most_five_collectives_and_one_host_sync():
    """DeepSpeed's own layer makes 4 collectives and 3-5 host syncs per step (BENCHMARKS.md)."""
    run_distributed(_drop_in_counts, 2, timeout=180)
