"""Router variants (group-limited routing by either group score, routed scaling, softmax after top-k,
selection bias, the gate's bias) and
the shared-expert gate, against a naive per-token reference over random draws of the config."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from moe_parallel import MoEConfig, MoELayer
from moe_parallel.core.config import MoEConfigError
from moe_parallel.core.router import TopKRouter, top_k_indices
from tests.reference import naive_top_k


def naive_route(router: TopKRouter, x_TD: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    """Experts (best first) and combine weights of each token, decided one token at a time in float64."""
    cfg = router.config
    experts, weights = [], []
    for x_D in x_TD.double():
        logits = router.weight.detach().double() @ x_D
        if router.bias is not None:
            logits = logits + router.bias.detach().double()
        bias = router.expert_bias.double() if router.uses_expert_bias else None
        chosen, w = naive_top_k(cfg, logits, bias)
        experts.append(chosen)
        weights.append(w.tolist())
    return experts, weights


def random_config(rng: random.Random, hidden: int = 8) -> MoEConfig:
    num_experts = rng.choice([2, 4, 6, 8, 12, 16])
    num_groups = rng.choice([g for g in range(1, num_experts + 1) if num_experts % g == 0])
    topk_groups = rng.randint(1, num_groups)
    top_k = rng.randint(1, topk_groups * (num_experts // num_groups))
    score_func = rng.choice(["softmax", "sigmoid"])
    return MoEConfig(
        hidden_size=hidden,
        ffn_hidden_size=6,
        num_experts=num_experts,
        top_k=top_k,
        score_func=score_func,
        normalize_top_k=rng.random() < 0.5,
        score_after_topk=score_func == "softmax" and rng.random() < 0.3,
        num_groups=num_groups,
        topk_groups=topk_groups,
        group_score=rng.choice(["top2_sum", "max"]),
        router_bias=rng.random() < 0.5,
        routed_scaling_factor=rng.choice([1.0, 2.5, 0.7]),
        selection_bias=rng.random() < 0.5,
        capacity_factor=None,
        eval_capacity_factor=None,
        activation="swiglu",
        aux_loss_coeff=0.0,
        init_std=0.5,
        init_seed=rng.randint(0, 10**6),
    )


@pytest.mark.parametrize("draw", range(40))
def test_router_matches_naive_reference(draw):
    rng = random.Random(draw)
    cfg = random_config(rng)
    router = TopKRouter(cfg, seed=draw).eval()
    if router.bias is not None:
        with torch.no_grad():
            router.bias.copy_(torch.randn(cfg.num_experts, generator=torch.Generator().manual_seed(500 + draw)))
    if router.uses_expert_bias:
        router.expert_bias.copy_(torch.randn(cfg.num_experts, generator=torch.Generator().manual_seed(draw)) * 0.3)
    x_TD = torch.randn(13, cfg.hidden_size, generator=torch.Generator().manual_seed(1000 + draw))
    out = router(x_TD)
    experts, weights = naive_route(router, x_TD)
    assert out.expert_TK.tolist() == experts, cfg
    torch.testing.assert_close(out.weight_TK.double(), torch.tensor(weights, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    counts = torch.bincount(torch.tensor(experts).flatten(), minlength=cfg.num_experts)
    assert out.tokens_per_expert_E.tolist() == counts.tolist()


@pytest.mark.parametrize("draw", range(8))
def test_top_1_selection_is_the_first_maximum(draw):
    """k = 1 takes an argmax instead of topk: the same expert on distinct scores, the lowest index
    among tied maxima, -inf (experts outside the chosen groups) never chosen while a finite score is."""
    gen = torch.Generator().manual_seed(draw)
    tokens, experts = int(torch.randint(1, 5000, (1,), generator=gen)), int(torch.randint(1, 130, (1,), generator=gen))
    scores_TE = torch.rand(tokens, experts, generator=gen)
    assert torch.equal(top_k_indices(scores_TE, 1), torch.topk(scores_TE, 1, dim=-1).indices)
    coarse_TE = torch.randint(0, 3, (tokens, experts), generator=gen).float()  # many tied maxima
    coarse_TE[torch.rand(tokens, experts, generator=gen) < 0.3] = float("-inf")
    coarse_TE[:, -1] = -1.0  # every row keeps a finite score
    chosen_T = top_k_indices(coarse_TE, 1)[:, 0]
    best_T = coarse_TE.max(dim=-1).values
    positions_TE = torch.arange(experts).expand(tokens, experts)
    first_T = torch.where(coarse_TE == best_T[:, None], positions_TE, experts).min(dim=-1).values
    assert torch.equal(chosen_T, first_T)
    for k in range(2, min(experts, 8) + 1):
        assert torch.equal(top_k_indices(scores_TE, k), torch.topk(scores_TE, k, dim=-1).indices)


def test_group_limited_routing_keeps_tokens_inside_their_best_groups():
    # 8 experts in 4 groups; the token may only use the 2 groups whose top-2 sums are highest.
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=8, top_k=2, num_groups=4, topk_groups=2,
                    score_func="sigmoid", selection_bias=True)  # fmt: skip
    router = TopKRouter(cfg, seed=0).eval()
    router.weight.data.zero_()
    # Selection scores = 0.5 + bias: group 0 has the single best expert but a poor second one.
    router.expert_bias.copy_(torch.tensor([0.9, -0.9, 0.3, 0.3, 0.2, 0.2, 0.0, 0.1]))
    out = router(torch.zeros(1, 8))
    assert sorted(out.expert_TK[0].tolist()) == [2, 3]  # groups 1 (1.6) and 2 (1.4) beat group 0 (1.0)
    # The bias chose the experts; the weights are their unbiased scores, renormalised.
    torch.testing.assert_close(out.weight_TK, torch.full((1, 2), 0.5))


@pytest.mark.parametrize("draw", range(12))
def test_layer_with_router_variants_and_gated_shared_expert_matches_naive(draw):
    rng = random.Random(100 + draw)
    base = random_config(rng)
    cfg = MoEConfig(**{**base.to_dict(), "shared_expert_ffn_hidden_size": 5, "shared_expert_gate": True})
    layer = MoELayer(cfg, layer_number=draw)
    layer.train()
    gen = torch.Generator().manual_seed(draw)
    if layer.router.uses_expert_bias:
        layer.router.expert_bias.copy_(torch.randn(cfg.num_experts, generator=gen) * 0.2)
    if layer.router.bias is not None:
        with torch.no_grad():
            layer.router.bias.normal_(0.0, 0.5, generator=gen)
    x = torch.randn(2, 7, cfg.hidden_size, generator=gen).requires_grad_()
    y = layer(x)

    experts, _ = naive_route(layer.router, x.detach().reshape(-1, cfg.hidden_size))
    x_TD = x.reshape(-1, cfg.hidden_size)
    logits = F.linear(x_TD, layer.router.weight, layer.router.bias)
    scores = torch.softmax(logits, -1) if cfg.score_func == "softmax" else torch.sigmoid(logits)
    rows = []
    for t, chosen in enumerate(experts):
        if cfg.score_after_topk:
            w = torch.softmax(logits[t, chosen], 0)
        else:
            w = scores[t, chosen]
            if cfg.normalize_top_k and cfg.top_k > 1:
                w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        out = sum(w[i] * _swiglu(x_TD[t], layer.experts.w1[e], layer.experts.w2[e]) for i, e in enumerate(chosen))
        shared = _swiglu(x_TD[t], layer.shared_expert.w1[0], layer.shared_expert.w2[0])
        rows.append(out + torch.sigmoid(x_TD[t] @ layer.shared_gate.weight[0]) * shared)
    ref = torch.stack(rows).view_as(y)
    # fp32 sums in another order: errors scale with the largest terms, not with each element.
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.detach().abs().max()))

    grad = torch.randn(y.shape, generator=gen)
    got = torch.autograd.grad(y, [x, *layer.parameters()], grad)
    want = torch.autograd.grad(ref, [x, *layer.parameters()], grad)
    for (name, _), g, w in zip([("x", None), *layer.named_parameters()], got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()), msg=name)


def _swiglu(x_D, w1_DH, w2_FD):
    gate, up = (x_D @ w1_DH).chunk(2, -1)
    return (F.silu(gate) * up) @ w2_FD


@pytest.mark.parametrize(
    "fields, key",
    [
        (dict(num_experts=6, num_groups=4), "num_groups"),
        (dict(num_experts=8, num_groups=4, topk_groups=5), "topk_groups"),
        (dict(num_experts=8, num_groups=4, topk_groups=1, top_k=3), "top_k"),
        (dict(num_experts=8, routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(num_experts=8, score_func="sigmoid", score_after_topk=True), "score_after_topk"),
        (dict(num_experts=8, shared_expert_gate=True), "shared_expert_gate"),
        (dict(num_experts=8, num_groups=0), "num_groups"),
    ],
)
def test_invalid_router_config_names_the_field(fields, key):
    with pytest.raises(MoEConfigError, match=rf"moe\.{key}="):
        MoEConfig(hidden_size=8, ffn_hidden_size=4, **fields)


def test_selection_bias_is_a_checkpointed_buffer_without_update_rate():
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, selection_bias=True)
    layer = MoELayer(cfg)
    assert "router.expert_bias" in layer.state_dict()
    before = layer.router.expert_bias.clone()
    layer.train()(torch.randn(5, 8))
    layer.update_expert_bias()  # no update rate: the bias is a fixed (loaded) correction
    torch.testing.assert_close(layer.router.expert_bias, before)
