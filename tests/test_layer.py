"""Single-process tests of the MoE layer: known answers, the naive oracle, gradients, bad input."""

from __future__ import annotations

import pytest
import torch

from moe_parallel import MoEConfig, MoEConfigError, MoEInputError, MoELayer, expert_capacity, plan_dispatch
from moe_parallel.core.capacity import order_by_expert
from moe_parallel.experts import LoopExpertMLP, PaddedExpertMLP, grouped_mlp
from tests.reference import naive_keep, naive_moe


def make_layer(dtype=torch.float64, **overrides) -> MoELayer:
    kwargs = dict(hidden_size=8, ffn_hidden_size=12, num_experts=4, top_k=2, min_capacity=0, init_std=0.3)
    kwargs.update(overrides)
    return MoELayer(MoEConfig(**kwargs)).to(dtype)


# ---------------------------------------------------------------- capacity: known answers


@pytest.mark.parametrize(
    "tokens,k,experts,factor,min_cap,expected",
    [
        (4096, 2, 8, 1.25, 4, 1280),  # exact: no float rounding up to 1281
        (4096, 8, 64, 1.25, 4, 640),
        (10, 1, 4, 1.0, 0, 3),  # ceil(2.5)
        (10, 1, 4, 1.0, 5, 5),  # min_capacity wins
        (0, 2, 4, 1.25, 4, 4),
        (7, 2, 4, 1.1, 0, 4),  # ceil(3.85)
        (100, 2, 8, None, 4, None),  # dropless
    ],
)
def test_expert_capacity_known_answers(tokens, k, experts, factor, min_cap, expected):
    assert expert_capacity(tokens, k, experts, factor, min_cap) == expected


def _kept(plan):
    return int(plan.num_kept)


def _kept_pairs(plan, num_tokens):
    kept_token_idx = plan.token_idx_A[: _kept(plan)]
    pairs = sorted((int(t), int(e)) for t, e in zip(kept_token_idx, _expert_of(plan), strict=True))
    # Every assignment is listed once: the dropped ones after the kept ones.
    k = plan.token_idx_A.numel() // max(1, num_tokens)
    assert sorted(plan.token_idx_A.tolist()) == sorted(list(range(num_tokens)) * k)
    return pairs


def _expert_of(plan):
    return torch.repeat_interleave(torch.arange(plan.tokens_per_expert_E.numel()), plan.tokens_per_expert_E)


def test_position_policy_first_choices_first():
    # 4 tokens, top-2, 2 experts; everyone's first choice is expert 0, second is expert 1.
    expert_TK = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    weight_TK = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]])
    counts = torch.bincount(expert_TK.flatten(), minlength=2)
    plan = plan_dispatch(expert_TK, weight_TK, counts, capacity=2, drop_policy="position")
    # Expert 0 queue: first choices t0,t1,t2 then t3's second choice -> keeps t0,t1.
    # Expert 1 queue: first choice t3, then second choices t0,t1,t2 -> keeps t3,t0.
    assert _kept_pairs(plan, 4) == [(0, 0), (0, 1), (1, 0), (3, 1)]
    assert plan.tokens_per_expert_E.tolist() == [2, 2]
    assert int(plan.num_dropped) == 4
    assert torch.equal(plan.weight_A[: _kept(plan)], torch.tensor([0.6, 0.7, 0.8, 0.4]))


def test_probs_policy_keeps_highest_weights():
    expert_TK = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    weight_TK = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]])
    counts = torch.bincount(expert_TK.flatten(), minlength=2)
    plan = plan_dispatch(expert_TK, weight_TK, counts, capacity=2, drop_policy="probs")
    # Expert 0: weights t0 .6, t1 .7, t2 .9, t3 .2 -> t2, t1. Expert 1: t0 .4, t1 .3, t2 .1, t3 .8 -> t3, t0.
    assert _kept_pairs(plan, 4) == [(0, 1), (1, 0), (2, 0), (3, 1)]
    assert torch.equal(plan.weight_A[: _kept(plan)], torch.tensor([0.9, 0.7, 0.8, 0.4]))


def test_dropless_keeps_everything_sorted_by_expert():
    expert_TK = torch.tensor([[2, 0], [2, 1], [2, 0]])
    weight_TK = torch.rand(3, 2)
    counts = torch.bincount(expert_TK.flatten(), minlength=3)
    plan = plan_dispatch(expert_TK, weight_TK, counts, capacity=None, drop_policy="probs")
    assert plan.tokens_per_expert_E.tolist() == [2, 1, 3]
    assert int(plan.num_dropped) == 0
    assert _expert_of(plan).tolist() == sorted(_expert_of(plan).tolist())
    assert _kept_pairs(plan, 3) == sorted([(0, 2), (1, 2), (2, 2), (0, 0), (1, 1), (2, 0)])


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("capacity", [0, 1, 3, None])
def test_plan_matches_naive_keep(policy, k, capacity):
    gen = torch.Generator().manual_seed(k * 10 + (capacity or 99))
    T, E = 23, 8
    scores = torch.rand(T, E, generator=gen)
    expert_TK = torch.topk(scores, k, dim=-1).indices
    weight_TK = scores.gather(1, expert_TK)
    counts = torch.bincount(expert_TK.flatten(), minlength=E)
    plan = plan_dispatch(expert_TK, weight_TK, counts, capacity, policy)
    keep = naive_keep(expert_TK, weight_TK, E, capacity, policy)
    expected = sorted((t, int(expert_TK[t, kk])) for t, kk in keep.nonzero().tolist())
    assert _kept_pairs(plan, T) == expected
    assert int(plan.num_dropped) == T * k - len(expected)


@pytest.mark.parametrize("seed", range(12))
def test_one_sort_orders_like_priority_then_expert_sorts(seed):
    """order_by_expert's single int64-key sort equals two stable sorts (priority descending, then
    expert) for every dtype, with ties, zeros of both signs, negatives, infinities and huge values."""
    gen = torch.Generator().manual_seed(seed)
    num = int(torch.randint(0, 3000, (1,), generator=gen))
    experts = int(torch.randint(1, 300, (1,), generator=gen))
    expert_A = torch.randint(0, experts, (num,), generator=gen)
    pool = torch.cat([torch.rand(7, generator=gen), torch.tensor([0.0, -0.0, -1.5, 1e30, -1e-30, float("inf")])])
    if seed % 3 == 0:  # many ties
        priority_A = pool[torch.randint(0, len(pool), (num,), generator=gen)]
    else:
        priority_A = torch.randn(num, generator=gen) * 10 ** float(torch.randint(-3, 4, (1,), generator=gen))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        p = priority_A.to(dtype)
        by_priority = torch.argsort(p, descending=True, stable=True)
        expected = by_priority[torch.argsort(expert_A[by_priority], stable=True)]
        assert torch.equal(order_by_expert(expert_A, p), expected), dtype
    assert torch.equal(order_by_expert(expert_A), torch.argsort(expert_A, stable=True))


@pytest.mark.parametrize("experts", [1, 2, 255, 256, 257, 32768, 32769, 70000])
def test_narrow_sort_keys_keep_the_stable_order(experts):
    """With ``num_experts`` the ids are sorted as uint8, int16 or int32: the same stable order as the
    int64 sort, at the edges of each type and at sizes where the sort switches algorithm."""
    gen = torch.Generator().manual_seed(experts)
    for num in (0, 1, 17, 3000, 70000):
        expert_A = torch.randint(0, experts, (num,), generator=gen)
        if num:
            expert_A[0] = experts - 1  # the largest id is always there
        assert torch.equal(order_by_expert(expert_A, num_experts=experts), torch.argsort(expert_A, stable=True))


# ---------------------------------------------------------------- the layer against the oracle


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(top_k=1, capacity_factor=1.0, drop_policy="position"),
        dict(top_k=3, capacity_factor=0.5, drop_policy="probs"),
        dict(top_k=4, capacity_factor=None),  # dropless, every expert
        dict(num_experts=8, top_k=8, capacity_factor=0.75, min_capacity=2),
        dict(score_func="sigmoid", activation="swiglu", z_loss_coeff=1e-3),
        dict(activation="relu", expert_bias=True, normalize_top_k=False),
        dict(shared_expert_ffn_hidden_size=6, activation="silu"),
        dict(ffn_hidden_size=4, expert_bias=True),  # D > F: the row scale moves to the activation
        dict(ffn_hidden_size=3, activation="swiglu", capacity_factor=0.5, drop_policy="position"),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_layer_matches_naive_reference_fp64(overrides):
    torch.manual_seed(0)
    layer = make_layer(**overrides).train()
    if layer.experts.b1 is not None:
        with torch.no_grad():
            layer.experts.b1.normal_()
            layer.experts.b2.normal_()
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(3, 7, 8, dtype=torch.float64)

    y = layer(x)
    (y * grad_y).sum().backward()
    got = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}
    aux = layer.aux_loss.detach().clone()
    x.grad = None
    layer.zero_grad()

    y_ref, aux_ref = naive_moe(layer, x)
    ((y_ref * grad_y).sum() + aux_ref).backward()  # the attached aux loss adds d(aux)/d(params)
    want = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}

    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(aux, aux_ref.detach().to(aux.dtype), rtol=1e-6, atol=1e-7)
    for name in want:
        if want[name] is None:
            assert got[name] is None or torch.count_nonzero(got[name]) == 0, name
            continue
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("path", ["loop", "padded", "grouped"])
@pytest.mark.parametrize("ffn", [3, 6])
@pytest.mark.parametrize("bias", [False, True])
def test_expert_mlp_gradcheck(path, ffn, bias):
    """Each path's MLP on grouped rows (with padding rows past the counts) has exact gradients."""
    torch.manual_seed(1)
    counts, padding = [3, 0, 2], 2
    dtype = torch.float64 if path != "grouped" else torch.float32
    x = torch.randn(sum(counts) + padding, 4, dtype=dtype, requires_grad=True)
    w1 = torch.randn(3, 4, 2 * ffn, dtype=dtype, requires_grad=True)
    w2 = torch.randn(3, ffn, 4, dtype=dtype, requires_grad=True)
    b1 = torch.randn(3, 2 * ffn, dtype=dtype, requires_grad=True) if bias else None
    b2 = torch.randn(3, 4, dtype=dtype, requires_grad=True) if bias else None

    def mlp(x, w1, w2, *b):
        b1_, b2_ = b if b else (None, None)
        if path == "grouped":
            return grouped_mlp(x, torch.tensor(counts), w1, w2, b1_, b2_, "swiglu")
        fn = LoopExpertMLP if path == "loop" else PaddedExpertMLP
        return fn.apply(x, w1, w2, b1_, b2_, counts, "swiglu")

    inputs = (x, w1, w2, *((b1, b2) if bias else ()))
    y = mlp(*inputs)
    assert torch.count_nonzero(y[sum(counts) :]) == 0  # padding rows give zero rows
    if path == "grouped":  # float32 kernels: compare with the float64 loop instead of gradcheck
        ref = [t.detach().double().requires_grad_() for t in inputs]
        b1r, b2r = (ref[3], ref[4]) if bias else (None, None)
        y_ref = LoopExpertMLP.apply(ref[0], ref[1], ref[2], b1r, b2r, counts, "swiglu")
        g = torch.randn_like(y_ref)
        y.backward(g.float())
        y_ref.backward(g)
        torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
        for t, r in zip(inputs, ref):
            torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-5)
        return
    assert torch.autograd.gradcheck(mlp, inputs)


def test_eval_is_deterministic_and_uses_eval_capacity():
    layer = make_layer(router_noise="gumbel", capacity_factor=0.5, eval_capacity_factor=2.0).eval()
    x = torch.randn(16, 8, dtype=torch.float64)
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    assert layer.last_stats.capacity == expert_capacity(16, 2, 4, 2.0, 0)
    torch.testing.assert_close(y1, naive_moe(layer, x)[0])


def test_training_noise_changes_routing_only_in_training():
    for noise in ("jitter", "gumbel"):
        layer = make_layer(router_noise=noise, router_jitter_eps=0.5, capacity_factor=None).train()
        x = torch.randn(64, 8, dtype=torch.float64)
        torch.manual_seed(0)
        a = layer(x)
        torch.manual_seed(1)
        b = layer(x)
        assert not torch.allclose(a, b), noise


def test_router_is_float32_under_bf16_and_autocast():
    torch.manual_seed(0)
    layer = make_layer(dtype=torch.bfloat16, hidden_size=16, ffn_hidden_size=16)
    x = torch.randn(12, 16).to(torch.bfloat16)
    out = layer.router(x)
    assert out.logits_TE.dtype == torch.float32 and out.weight_TK.dtype == torch.float32
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = make_layer(dtype=torch.float32, hidden_size=16, ffn_hidden_size=16)
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    torch.testing.assert_close(y.float(), ref(x.float()), rtol=5e-2, atol=5e-2)

    fp32 = make_layer(dtype=torch.float32, hidden_size=16, ffn_hidden_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp32.router(x.float()).logits_TE.dtype == torch.float32
        y = fp32(x.float())
    y.float().sum().backward()
    assert fp32.experts.w1.grad.dtype == torch.float32


def test_stats_and_zero_tokens():
    layer = make_layer(capacity_factor=0.5).train()
    x = torch.randn(40, 8, dtype=torch.float64)
    layer(x)
    s = layer.last_stats
    assert s.tokens_per_expert.sum() == 80 and s.num_tokens == 40
    assert s.capacity == 10 and 0 < float(s.dropped_fraction) < 1
    assert 0 < float(s.router_entropy) <= torch.log(torch.tensor(4.0))
    empty = torch.zeros(0, 8, dtype=torch.float64, requires_grad=True)
    y = layer(empty)
    y.sum().backward()
    assert y.shape == (0, 8) and float(layer.last_stats.balance_loss) == 0.0


def test_aux_loss_reaches_router_gradient_through_output():
    layer = make_layer(aux_loss_coeff=1.0, z_loss_coeff=0.1).train()
    x = torch.randn(20, 8, dtype=torch.float64)
    y = layer(x)
    (y * 0).sum().backward()  # main loss contributes nothing: all router grad comes from the aux loss
    grad_attached = layer.router.weight.grad.clone()
    layer.zero_grad()
    _, aux_ref = naive_moe(layer, x)
    aux_ref.backward()
    torch.testing.assert_close(grad_attached, layer.router.weight.grad)
    assert grad_attached.abs().sum() > 0


def test_aux_loss_free_bias_balances_load():
    torch.manual_seed(0)
    layer = make_layer(num_experts=4, top_k=1, capacity_factor=None, expert_bias_update_rate=0.005, aux_loss_coeff=0.0)
    with torch.no_grad():
        layer.router.weight[0] += 0.3  # expert 0 is the favourite of most tokens at first
    x = torch.randn(512, 8, dtype=torch.float64) + 1.0
    layer.train()
    layer(x)
    first = layer.last_stats.tokens_per_expert.clone()
    late_max = []
    for step in range(200):
        layer(x)
        layer.update_expert_bias()
        if step >= 180:
            late_max.append(int(layer.last_stats.tokens_per_expert.max()))
    assert first.max() > 300, first
    assert max(late_max) < 200, late_max  # balanced would be 128 each
    assert layer.router.expert_bias[0] < 0


def test_expert_init_depends_on_global_id_and_layer():
    a = make_layer()
    b = make_layer()
    c = MoELayer(a.config, layer_number=1)
    assert torch.equal(a.experts.w1, b.experts.w1)
    assert not torch.equal(a.experts.w1.float(), c.experts.w1)
    assert not torch.equal(a.experts.w1[0], a.experts.w1[1])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(top_k=5), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(drop_policy="random"), "drop_policy"),
        (dict(score_func="relu"), "score_func"),
        (dict(activation="tanh"), "activation"),
        (dict(min_capacity=-1), "min_capacity"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(MoEConfigError, match=f"moe.{field}="):
        make_layer(**overrides)


def test_bad_input_is_a_clear_error():
    layer = make_layer(check_inputs=True)
    with pytest.raises(MoEInputError, match="hidden_size=8"):
        layer(torch.randn(4, 9, dtype=torch.float64))
    bad = torch.randn(4, 8, dtype=torch.float64)
    bad[1, 2] = float("nan")
    with pytest.raises(MoEInputError, match="NaN"):
        layer(bad)
    with pytest.raises(MoEInputError, match="floating point"):
        layer(torch.ones(4, 8, dtype=torch.int64))
