"""Every expert execution path (loop, padded, and auto's cost-model choice) equals the naive oracle.

Forward and backward, float64, over random draws of shapes: experts, k, hidden and FFN widths
(D < F and D > F), capacity factors that drop and dropless routing, both drop policies, biases,
SwiGLU, experts without rows; and expert parallelism on 2 gloo processes.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from moe_parallel import GroupedExperts, MoEConfig, MoEConfigError, MoELayer, expert_cost
from moe_parallel import experts as experts_module
from moe_parallel.expert_cost import DEFAULT_COST_MODEL, ExpertCostModel, choose_expert_path
from moe_parallel.experts import _PaddedExpertMLP
from tests.dist_utils import run_distributed
from tests.reference import naive_moe

PATHS = ("loop", "padded", "auto")


def _draw(seed: int) -> dict:
    rng = random.Random(seed)
    experts = rng.choice([2, 3, 4, 8])
    return dict(
        hidden_size=rng.choice([4, 8, 12]),
        ffn_hidden_size=rng.choice([3, 8, 16]),
        num_experts=experts,
        top_k=rng.randint(1, min(experts, 3)),
        capacity_factor=rng.choice([0.5, 1.0, 1.25, 2.0, None]),
        drop_policy=rng.choice(["position", "probs"]),
        activation=rng.choice(["gelu", "swiglu", "relu"]),
        expert_bias=rng.random() < 0.3,
        min_capacity=rng.choice([0, 2]),
        init_std=0.4,
    )


def _layer(path: str, kwargs: dict) -> MoELayer:
    layer = MoELayer(MoEConfig(expert_gemm=path, **kwargs)).double().train()
    if layer.experts.b1 is not None:
        with torch.no_grad():
            layer.experts.b1.normal_()
            layer.experts.b2.normal_()
    return layer


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("path", PATHS)
def test_every_path_equals_the_oracle(path: str, seed: int) -> None:
    kwargs = _draw(seed)
    torch.manual_seed(seed)
    layer = _layer(path, kwargs)
    oracle = _layer("loop", kwargs)
    oracle.load_state_dict(layer.state_dict())
    tokens = random.Random(seed).choice([1, 5, 17, 40])
    x = torch.randn(tokens, kwargs["hidden_size"], dtype=torch.float64)
    if seed % 4 == 0:  # starve expert 0: an expert without rows
        with torch.no_grad():
            for lay in (layer, oracle):
                lay.router.weight[0] = -5.0 * lay.router.weight[0].sign() * x.mean(0).sign()
    grad = torch.randn_like(x)

    x_ours = x.clone().requires_grad_()
    y = layer(x_ours)
    (y * grad).sum().backward()
    x_ref = x.clone().requires_grad_()
    y_ref, aux_ref = naive_moe(oracle, x_ref)
    ((y_ref * grad).sum() + aux_ref).backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.router.weight.grad, oracle.router.weight.grad, rtol=1e-8, atol=1e-10)
    for (name, p), q in zip(layer.experts.named_parameters(), oracle.experts.parameters()):
        want = torch.zeros_like(q) if q.grad is None else q.grad
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-10, msg=name)


def _padded_equals_loop(build, x, counts, weight, token_idx, unique: bool, grad) -> list[list]:
    """Forward and backward of ``build(path)`` on both CPU paths, asserted equal; per path: the output,
    the gradients of the input and of the combine weights, and every parameter's gradient."""
    results = []
    for path in ("loop", "padded"):
        module = build(path)
        if module.b1 is not None:
            with torch.no_grad():
                module.b1.normal_(generator=torch.Generator().manual_seed(2))
                module.b2.normal_(generator=torch.Generator().manual_seed(3))
        x_ = x.clone().requires_grad_()
        w_ = None if weight is None else weight.clone().requires_grad_()
        y = module(x_, counts, w_, token_idx, tokens_unique=unique)
        y.backward(grad)
        results.append([y, x_.grad, None if w_ is None else w_.grad, *(p.grad for p in module.parameters())])
    for got, want in zip(results[1], results[0]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    return results


@pytest.mark.parametrize(
    "gathered, unique", [(False, False), (True, False), (True, True)], ids=["grouped-rows", "token-index", "top1"]
)
@pytest.mark.parametrize("scaled", [False, True], ids=["unweighted", "weighted"])
def test_padded_equals_the_loop_on_raw_rows(unique: bool, gathered: bool, scaled: bool) -> None:
    """The experts module alone, every branch of the combine (incl. the top-1 write and dropped tokens)."""
    torch.manual_seed(1)
    counts = [4, 0, 3, 1]
    if not gathered:
        token_idx, x = None, torch.randn(8, 6, dtype=torch.float64)
    elif unique:  # tokens 1, 4 and 9 were dropped: they must come out zero, with zero gradient
        token_idx, x = torch.tensor([0, 2, 3, 5, 6, 7, 8, 10]), torch.randn(11, 6, dtype=torch.float64)
    else:
        token_idx, x = torch.tensor([0, 2, 3, 5, 1, 2, 5, 0]), torch.randn(7, 6, dtype=torch.float64)
    weight = torch.rand(8, dtype=torch.float64) if scaled else None
    grad = torch.randn_like(x)

    def build(path: str) -> GroupedExperts:
        return GroupedExperts(4, 6, 10, expert_gemm=path, init_std=0.3, bias=True).double()

    results = _padded_equals_loop(build, x, counts, weight, token_idx, unique, grad)
    assert torch.count_nonzero(results[1][3][1]) == 0  # the idle expert's w1 gradient
    if unique:
        dropped = torch.tensor([1, 4, 9])
        assert torch.count_nonzero(results[1][0][dropped]) == 0
        assert torch.count_nonzero(results[1][1][dropped]) == 0


@pytest.mark.parametrize("seed", range(10))
def test_padded_runs_of_any_size_equal_the_loop(seed: int, monkeypatch) -> None:
    """The padded path split into runs of experts (one expert per run up to all in one), every branch
    of the combine, idle experts anywhere, against the loop on the same rows."""
    rng = random.Random(seed)
    experts, hidden, ffn = rng.choice([3, 5, 9]), rng.choice([4, 6]), rng.choice([3, 10])
    activation = rng.choice(["gelu", "swiglu", "silu"])
    counts = [rng.choice([0, 1, 2, 5, 7]) for _ in range(experts)]
    counts[rng.randrange(experts)] = rng.randint(1, 6)  # at least one expert with rows
    rows = sum(counts)
    width = max(hidden, 2 * ffn if activation == "swiglu" else ffn)
    monkeypatch.setattr(experts_module, "PADDED_RUN_BYTES", rng.choice([1, 3, 12, 10**6]) * width * 8)
    layout = rng.choice(["grouped-rows", "token-index", "top1"])
    gen = torch.Generator().manual_seed(seed)
    if layout == "grouped-rows":
        token_idx, x = None, torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    elif layout == "top1":  # every token at most once; the others were dropped
        x = torch.randn(rows + 3, hidden, generator=gen, dtype=torch.float64)
        token_idx = torch.randperm(rows + 3, generator=gen)[:rows]
    else:
        x = torch.randn(max(rows // 2, 1), hidden, generator=gen, dtype=torch.float64)
        token_idx = torch.randint(0, x.shape[0], (rows,), generator=gen)
    weight = torch.rand(rows, generator=gen, dtype=torch.float64) if seed % 3 else None
    grad = torch.randn_like(x)

    def build(path: str) -> GroupedExperts:
        bias = seed % 2 == 0
        return GroupedExperts(experts, hidden, ffn, activation, bias=bias, expert_gemm=path, init_std=0.3).double()

    _padded_equals_loop(build, x, counts, weight, token_idx, layout == "top1", grad)


@pytest.mark.parametrize("seed", range(20))
def test_padded_runs_cover_the_active_experts_in_runs_within_budget(seed: int) -> None:
    rng = random.Random(seed)
    counts = [rng.choice([0, 0, 1, 3, 8, 40]) for _ in range(rng.randint(1, 30))]
    width, elem, budget = rng.choice([4, 64]), rng.choice([2, 4]), rng.choice([1, 512, 4096, 1 << 20])
    runs = experts_module.padded_runs(counts, width, elem, budget)
    assert [j for run in runs for j in run] == [j for j, n in enumerate(counts) if n]  # each active one, once, in order
    for run, following in zip(runs, runs[1:] + [None]):
        size = len(run) * max(counts[run.start : run.stop]) * width * elem
        assert len(run) == 1 or size <= budget  # an expert over budget runs alone
        if following is not None and following.start == run.stop:  # greedy: the next one did not fit
            widest = max(counts[run.start : following.start + 1])
            assert (len(run) + 1) * widest * width * elem > budget


def _ep2_paths_equal_oracle(rank: int, world: int, path: str, cfg_kwargs: dict) -> None:
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=6, init_std=0.4, expert_gemm=path, **cfg_kwargs)
    ep_layer = MoELayer(cfg, ep_group=dist.group.WORLD).double().train()
    oracle = MoELayer(cfg).double().train()
    gen = torch.Generator().manual_seed(7)
    tokens = [13, 9]
    xs = [torch.randn(n, 8, generator=gen, dtype=torch.float64) for n in tokens]
    gs = [torch.randn(n, 8, generator=gen, dtype=torch.float64) for n in tokens]
    e = cfg.num_experts // world
    mine = slice(rank * e, (rank + 1) * e)
    expert_grads = {n: torch.zeros_like(p[mine]) for n, p in oracle.experts.named_parameters()}
    for r in range(world):
        oracle.zero_grad()
        x_r = xs[r].clone().requires_grad_()
        y_r, aux_r = naive_moe(oracle, x_r, capacity_tokens=max(tokens))
        ((y_r * gs[r]).sum() + aux_r).backward()
        for n, p in oracle.experts.named_parameters():
            expert_grads[n] += p.grad[mine]
        if r == rank:
            want_y, want_gx = y_r.detach(), x_r.grad
    x = xs[rank].clone().requires_grad_()
    y = ep_layer(x)
    (y * gs[rank]).sum().backward()
    torch.testing.assert_close(y, want_y, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x.grad, want_gx, rtol=1e-9, atol=1e-10)
    for n, p in ep_layer.experts.named_parameters():
        torch.testing.assert_close(p.grad, expert_grads[n], rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize(
    "cfg_kwargs",
    [
        dict(num_experts=4, top_k=1, capacity_factor=1.0, drop_policy="position", min_capacity=0),
        dict(num_experts=8, top_k=3, capacity_factor=None, drop_policy="probs"),
    ],
    ids=["top1-dropping", "top3-dropless"],
)
def test_padded_path_under_expert_parallelism(cfg_kwargs: dict) -> None:
    run_distributed(_ep2_paths_equal_oracle, 2, "padded", cfg_kwargs)


@pytest.mark.parametrize(
    "cfg_kwargs",
    [
        dict(num_experts=4, top_k=2, capacity_factor=1.0, drop_policy="position", min_capacity=0),
        dict(num_experts=8, top_k=3, capacity_factor=None, activation="swiglu", expert_bias=True),
        dict(num_experts=2, top_k=1, capacity_factor=1.25, shared_expert_ffn_hidden_size=5),
    ],
    ids=["top2-dropping", "top3-dropless-swiglu-bias", "one-expert-per-rank-shared-expert"],
)
def test_loop_path_under_expert_parallelism(cfg_kwargs: dict) -> None:
    """At EP > 1 the loop writes its input gradient over the output gradient the dispatcher hands it
    (``owns_output_grad``); the shared expert, whose output gradient is shared, must not."""
    run_distributed(_ep2_paths_equal_oracle, 2, "loop", cfg_kwargs)


@pytest.mark.parametrize("seed", range(6))
def test_owning_the_output_gradient_writes_the_input_gradient_over_it(seed: int) -> None:
    """Grouped rows with ``owns_output_grad``: the same gradients as with a buffer of their own, and the
    input gradient is the output gradient's memory (one ``[N, D]`` buffer less at backward's peak)."""
    rng = random.Random(seed)
    experts_count, dim, ffn = rng.choice([1, 3, 6]), rng.choice([4, 9]), rng.choice([3, 12])
    counts = [rng.choice([0, 1, 4, 7]) for _ in range(experts_count)]
    rows = sum(counts)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    weight = torch.rand(rows, generator=gen, dtype=torch.float64) if rng.random() < 0.7 else None
    grad = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    kwargs = dict(activation=rng.choice(["gelu", "swiglu", "relu"]), bias=rng.random() < 0.5, init_std=0.4)
    results = []
    for owns in (False, True):
        experts = GroupedExperts(experts_count, dim, ffn, expert_gemm="loop", **kwargs).double()
        experts.owns_output_grad = owns
        x_ = x.clone().requires_grad_()
        w_ = None if weight is None else weight.clone().requires_grad_()
        grad_ = grad.clone()
        experts(x_, counts, w_).backward(grad_)
        if owns:  # the gradient handed in now holds the input gradient (a leaf's .grad is a copy of it)
            assert torch.equal(grad_, x_.grad)
        else:
            assert torch.equal(grad_, grad)
        results.append([x_.grad, None if w_ is None else w_.grad, *(p.grad for p in experts.parameters())])
    for got, want in zip(results[1], results[0]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_layer_lets_only_its_routed_experts_own_their_output_gradient() -> None:
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=6, num_experts=4, shared_expert_ffn_hidden_size=4)
    single = MoELayer(cfg)
    expert_parallel = MoELayer(cfg, ep_size=2)  # its group is bound later
    assert not single.experts.owns_output_grad  # EP=1 gathers per expert: the flag would not apply
    assert expert_parallel.experts.owns_output_grad
    assert not getattr(expert_parallel.shared_expert, "owns_output_grad", False)


def test_cost_model_prefers_padding_only_when_it_is_cheap() -> None:
    model = ExpertCostModel()
    even = [16] * 128  # many small experts, no padding: the calls dominate
    assert model.choose(even, 256, 128) == "padded"
    # Few experts with thousands of rows each and narrow products: copying every row into the padded
    # layout and out again costs more than the handful of calls it saves.
    gen = random.Random(0)
    busy = [gen.randint(2600, 3200) for _ in range(16)]
    assert model.choose(busy, 256, 128) == "loop"
    # One expert holds nearly every row: it runs alone, so the padding never multiplies its rows.
    skewed = [4096] + [1] * 7
    assert model.padded_s(skewed, 512, 2048, 4) < model.loop_s(skewed, 512, 2048, 4) * 1.5
    assert model.choose([0, 0, 0], 8, 8) == "loop"
    # The estimate grows with the padded slots and never with the loop's idle experts.
    assert model.padded_s([10, 20], 64, 64, 4) < model.padded_s([10, 40], 64, 64, 4)
    assert model.loop_s([10, 0, 0], 64, 64, 4) < model.loop_s([10, 1, 1], 64, 64, 4)


@pytest.fixture
def fresh_measurements(monkeypatch):
    """No path measured earlier in this process decides for the test."""
    monkeypatch.setattr(expert_cost, "_measured_paths", {})


class _FakeTimer:
    """Step seconds per path as given; counts the calls."""

    def __init__(self, loop_s: float, padded_s: float) -> None:
        self.seconds = {"loop": loop_s, "padded": padded_s}
        self.calls = 0

    def __call__(self, path: str) -> float:
        self.calls += 1
        return self.seconds[path]


@pytest.mark.parametrize("seed", range(6))
def test_auto_measures_both_paths_once_per_shape_and_keeps_the_loop_without_a_clear_gain(
    seed: int, fresh_measurements
) -> None:
    rng = random.Random(seed)
    hidden, ffn = rng.choice([64, 128, 256]), rng.choice([64, 128, 512])
    experts = rng.choice([64, 128])
    counts = [rng.randint(8, 24) for _ in range(experts)]  # many small experts: the model allows padding
    assert DEFAULT_COST_MODEL.choose(counts, hidden, ffn) == "padded"
    gain = rng.uniform(0.05, 0.5)
    faster = _FakeTimer(1.0, 1.0 - gain)
    assert choose_expert_path(counts, hidden, ffn, step_s=faster) == "padded"
    calls = faster.calls
    assert calls >= 4  # a warm-up and at least one timed step per path
    # The same shape again, or counts that moved within the half-octave: no second measurement.
    nudged = [n + rng.choice([0, 1]) for n in counts]
    assert choose_expert_path(nudged, hidden, ffn, step_s=faster) == "padded"
    assert faster.calls == calls
    # Another shape is measured afresh; a gain within PADDED_MIN_GAIN keeps the loop.
    marginal = _FakeTimer(1.0, 1.0 - expert_cost.PADDED_MIN_GAIN / 2)
    assert choose_expert_path([4 * n for n in counts], hidden, ffn, step_s=marginal) == "loop"
    assert marginal.calls == calls
    slower = _FakeTimer(1.0, 1.0 + gain)
    assert choose_expert_path(counts, hidden, ffn, "swiglu", step_s=slower) == "loop"


def test_auto_does_not_measure_where_the_model_or_the_expert_size_rules_padding_out(fresh_measurements) -> None:
    def never(path: str) -> float:
        raise AssertionError("measured")

    gen = random.Random(0)
    busy = [gen.randint(2600, 3200) for _ in range(16)]  # the model: the loop
    assert choose_expert_path(busy, 256, 128, step_s=never) == "loop"
    assert choose_expert_path([0, 0, 0], 8, 8, step_s=never) == "loop"
    # Experts of 4096 x 16384: each streams 512 MiB of weights per product; padding saves nothing.
    few_rows = [2] * 64
    assert DEFAULT_COST_MODEL.choose(few_rows, 4096, 16384) == "padded"
    assert choose_expert_path(few_rows, 4096, 16384, step_s=never) == "loop"
    assert choose_expert_path([16] * 128, 256, 128) == "padded"  # no timer: the model decides


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_auto_times_the_real_paths_without_touching_the_layer_or_the_rng(
    activation: str, fresh_measurements, monkeypatch
) -> None:
    layer = GroupedExperts(128, 16, 16, activation, bias=True)
    counts = [3] * 128
    x = torch.randn(384, 16)
    timed = []
    for mlp in (experts_module._ExpertMLP, experts_module._PaddedExpertMLP):
        monkeypatch.setattr(mlp, "apply", _recording(mlp.apply, timed, mlp.__name__))
    params_before = [p.detach().clone() for p in layer.parameters()]
    torch.manual_seed(11)
    rng_before = torch.get_rng_state()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        path = layer.execution_path(x, counts)
    assert path in ("loop", "padded")
    assert {"_ExpertMLP", "_PaddedExpertMLP"} <= set(timed)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(p.grad is None for p in layer.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params_before, layer.parameters()))
    timed.clear()
    with torch.no_grad():
        assert layer.execution_path(x, counts) == path and not timed  # measured once, forwards only
    (key,) = expert_cost._measured_paths
    assert not key[5]  # no autograd: only forwards were timed (no weight gradients allocated)
    assert layer.execution_path(x, counts) in ("loop", "padded")  # training steps: measured afresh
    assert {"_ExpertMLP", "_PaddedExpertMLP"} <= set(timed)
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("reentrant", [False, True])
def test_auto_measures_inside_activation_checkpointing(reentrant: bool, fresh_measurements) -> None:
    """The first step measures inside a checkpointed forward (saved-tensor hooks, or no grad): the
    checkpoint still recomputes what it saved, and the gradients equal an unchecked step's."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=32, ffn_hidden_size=32, num_experts=128, top_k=2, capacity_factor=2.0))
    x = torch.randn(512, 32, requires_grad=True)
    checkpoint(layer, x, use_reentrant=reentrant).sum().backward()
    assert expert_cost._measured_paths  # the auto path was measured in that step
    checked = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    layer(x).sum().backward()
    for a, b in zip(checked, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b)


def _recording(apply, log: list, name: str):
    def wrapped(*args):
        log.append(name)
        return apply(*args)

    return wrapped


def test_expert_gemm_forces_a_path() -> None:
    x = torch.zeros(4, 8)
    assert GroupedExperts(2, 8, 8, expert_gemm="loop").execution_path(x, [1, 1]) == "loop"
    assert GroupedExperts(2, 8, 8, expert_gemm="padded").execution_path(x, [5, 0]) == "padded"
    assert GroupedExperts(2, 8, 8, expert_gemm="padded").execution_path(x, [0, 0]) == "loop"  # nothing to pad
    with pytest.raises(MoEConfigError, match=r"moe\.expert_gemm='bmm'.*padded"):
        MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2, expert_gemm="bmm")


@pytest.mark.parametrize("unique", [False, True], ids=["shared-tokens", "top1"])
def test_padded_gradcheck(unique: bool) -> None:
    """Finite differences through the padded path's hand-written backward (SwiGLU, biases, weights)."""
    torch.manual_seed(4)
    counts = [2, 0, 3]
    token_idx = torch.tensor([0, 3, 1, 4, 5]) if unique else torch.tensor([0, 3, 1, 3, 0])
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, w, w1, w2, b1, b2):
        return _PaddedExpertMLP.apply(x, w, token_idx, w1, w2, b1, b2, counts, "swiglu", unique)

    assert torch.autograd.gradcheck(fn, (x, w, w1, w2, b1, b2))


@pytest.mark.parametrize("seed", range(4))
def test_a_second_backward_through_a_retained_graph_recomputes_what_the_first_freed(seed: int) -> None:
    """The loop frees each expert's saved pre-activation during backward; a retained graph still works."""
    kwargs = _draw(seed)
    torch.manual_seed(seed)
    layer = _layer("loop", kwargs)
    x = torch.randn(23, kwargs["hidden_size"], dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    y = layer(x)
    y.backward(grad, retain_graph=True)
    first = [p.grad.clone() for p in (x, *layer.experts.parameters())]
    for p in (x, *layer.experts.parameters()):
        p.grad = None
    y.backward(grad)
    for want, p in zip(first, (x, *layer.experts.parameters())):
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["loop", "padded"])
def test_top1_dropped_tokens_get_exact_zeros_from_a_reused_buffer(path: str) -> None:
    """Top-1 combines by writing into an uninitialised buffer; the dropped tokens' rows are zeroed
    explicitly. Freed NaN-filled memory of the same size makes a missed row visible."""
    torch.manual_seed(3)
    layer = (
        MoELayer(
            MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=1, capacity_factor=0.5, expert_gemm=path)
        )
        .double()
        .train()
    )
    x = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    for _ in range(3):
        del_me = torch.full_like(x, float("nan"))
        del del_me
        y = layer(x)
        y.backward(torch.ones_like(y))
        dropped = layer.last_stats.dropped_fraction.item()
        assert dropped > 0
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        zero_rows = (y == 0).all(-1)
        assert zero_rows.sum().item() == round(dropped * 64)
        x.grad = None
