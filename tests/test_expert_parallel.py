"""Expert parallelism on several gloo processes equals the single-process oracle on the same batch.

Every rank routes its own shard of the global batch; capacity comes from the rank's own shard, as in
DeepSpeed. The oracle runs each shard through the naive per-token MoE. On rank r:
output, aux loss, input grad and router grad equal shard r's; each local expert's grad equals the
sum over all shards of that expert's grad.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_parallel import MoEConfig, MoEConfigError, MoEInputError, MoELayer
from tests.dist_utils import run_distributed
from tests.reference import naive_moe

D = 8


def _shards(tokens_per_rank: list[int], seed: int, starve_experts: list[int]) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, D, generator=gen, dtype=torch.float64) for n in tokens_per_rank]
    gs = [torch.randn(n, D, generator=gen, dtype=torch.float64) for n in tokens_per_rank]
    if starve_experts:
        for x in xs:
            x[:, 0] = 10.0  # with router weight -5 on this feature, starved experts are never chosen
    return xs, gs


def _starve(layer: MoELayer, experts: list[int]) -> None:
    with torch.no_grad():
        for e in experts:
            layer.router.weight[e, 0] = -5.0


def _ep_equals_oracle(rank, world, cfg_kwargs, tokens_per_rank, seed, starve_experts):
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=6, init_std=0.4, **cfg_kwargs)
    ep_layer = MoELayer(cfg, ep_group=dist.group.WORLD).double().train()
    oracle = MoELayer(cfg).double().train()
    _starve(ep_layer, starve_experts)
    _starve(oracle, starve_experts)
    xs, gs = _shards(tokens_per_rank, seed, starve_experts)
    e = cfg.num_experts // world
    mine = slice(rank * e, (rank + 1) * e)
    torch.testing.assert_close(ep_layer.experts.w1, oracle.experts.w1[mine], rtol=0, atol=0)

    expert_grads = {n: torch.zeros_like(p[mine]) for n, p in oracle.experts.named_parameters()}
    for r in range(world):
        oracle.zero_grad()
        x_r = xs[r].clone().requires_grad_()
        y_r, aux_r = naive_moe(oracle, x_r)
        ((y_r * gs[r]).sum() + aux_r).backward()
        for n, p in oracle.experts.named_parameters():
            if p.grad is not None:  # None when the shard has no tokens at all
                expert_grads[n] += p.grad[mine]
        if r == rank:
            want_y, want_aux = y_r.detach(), aux_r.detach()
            want_gx = torch.zeros_like(x_r) if x_r.grad is None else x_r.grad
            want_router = oracle.router.weight.grad
            want_router = torch.zeros_like(oracle.router.weight) if want_router is None else want_router.clone()

    x = xs[rank].clone().requires_grad_()
    y = ep_layer(x)
    (y * gs[rank]).sum().backward()
    torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ep_layer.aux_loss.double(), want_aux.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, want_gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ep_layer.router.weight.grad, want_router, rtol=1e-5, atol=1e-6)
    for n, p in ep_layer.experts.named_parameters():
        torch.testing.assert_close(p.grad, expert_grads[n], rtol=1e-5, atol=1e-6, msg=n)
    assert ep_layer.last_stats.capacity == (
        None if cfg.capacity_factor is None else oracle_capacity(cfg, tokens_per_rank[rank])
    )
    if rank * e in starve_experts:  # this rank's experts got no tokens, yet it joined every collective
        assert torch.count_nonzero(ep_layer.experts.w1.grad) == 0


def oracle_capacity(cfg: MoEConfig, tokens: int) -> int:
    from moe_parallel import expert_capacity

    return expert_capacity(tokens, cfg.top_k, cfg.num_experts, cfg.capacity_factor, cfg.min_capacity)


CASES = {
    "ep2-position-drops": (2, dict(num_experts=4, top_k=2, capacity_factor=1.0, drop_policy="position"), [16, 16], []),
    "ep4-probs": (4, dict(num_experts=8, top_k=2, capacity_factor=1.25, drop_policy="probs"), [12] * 4, []),
    "ep4-one-expert-per-rank-swiglu-shared": (
        4,
        dict(
            num_experts=4,
            top_k=2,
            score_func="sigmoid",
            activation="swiglu",
            z_loss_coeff=1e-2,
            shared_expert_ffn_hidden_size=4,
            capacity_factor=0.8,
        ),
        [10] * 4,
        [],
    ),
    "ep2-dropless": (2, dict(num_experts=4, top_k=3, capacity_factor=None), [16, 16], []),
    "ep2-uneven-token-counts": (2, dict(num_experts=4, top_k=2, capacity_factor=0.75, min_capacity=1), [20, 7], []),
    "ep2-rank-with-no-tokens": (2, dict(num_experts=4, top_k=2, capacity_factor=1.0), [16, 0], []),
    "ep2-no-tokens-for-a-rank's-experts": (2, dict(num_experts=4, top_k=2, capacity_factor=2.0), [16, 16], [2, 3]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_expert_parallel_equals_single_process(case):
    world, cfg_kwargs, tokens, starve = CASES[case]
    run_distributed(_ep_equals_oracle, world, cfg_kwargs, tokens, 7, starve)


def _bad_input_stops_every_rank(rank, world):
    layer = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=6, num_experts=4), ep_group=dist.group.WORLD)
    x = torch.randn(5, D + 1 if rank == 1 else D)
    with pytest.raises(MoEInputError, match="hidden_size=8" if rank == 1 else "another rank"):
        layer(x)
    nan = torch.randn(5, D)
    if rank == 0:
        nan[0, 0] = float("nan")
    checked = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=6, num_experts=4, check_inputs=True), dist.group.WORLD)
    with pytest.raises(MoEInputError, match="NaN" if rank == 0 else "another rank"):
        checked(nan)
    with pytest.raises(MoEConfigError, match="not divisible by the expert-parallel size 2"):
        MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=6, num_experts=3, top_k=1), ep_group=dist.group.WORLD)
    # The group is still usable: nobody is stuck in a collective.
    y = layer(torch.randn(5, D))
    assert y.shape == (5, D)


def test_bad_input_on_one_rank_fails_every_rank_without_hanging():
    run_distributed(_bad_input_stops_every_rank, 2, timeout=120)


def _bias_update_agrees(rank, world):
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=6, num_experts=4, top_k=1, expert_bias_update_rate=0.01)
    layer = MoELayer(cfg, ep_group=dist.group.WORLD).train()
    torch.manual_seed(rank)
    layer(torch.randn(32 * (rank + 1), D))
    layer.update_expert_bias(dist.group.WORLD)
    bias = layer.router.expert_bias.clone()
    gathered = [torch.empty_like(bias) for _ in range(world)]
    dist.all_gather(gathered, bias)
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    assert bias.abs().sum() > 0


def test_expert_bias_update_is_identical_on_every_rank():
    run_distributed(_bias_update_agrees, 2, timeout=120)
