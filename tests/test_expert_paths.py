"""Every CPU expert execution path (loop, padded, and auto's cost-model choice) equals the naive oracle,
and auto's choice is a deterministic function of the shape.

Forward and backward, float64, over random draws of shapes: experts, k, hidden and FFN widths
(D < F and D > F), capacity factors that drop and dropless routing, both drop policies, biases,
SwiGLU, experts without rows, padding rows past the counts; and expert parallelism on 2 gloo
processes. The choice: no timing, one resolution per layer, a pinned calibration file honoured.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import torch.distributed as dist

from moe_parallel import GroupedExperts, MoEConfig, MoEConfigError, MoELayer
from moe_parallel.experts import LoopExpertMLP, PaddedExpertMLP, choice, padded_runs
from moe_parallel.experts import padded as padded_module
from moe_parallel.experts.choice import COST_FILE_ENV, DEFAULT_COST_MODEL, ExpertCostModel, choose_expert_path
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


def _padded_equals_loop(build, x, tokens_per_expert, grad, counts_host=None) -> list[list]:
    """Forward and backward of ``build(path)`` on both CPU paths, asserted equal; per path: the output,
    the input's gradient, and every parameter's gradient."""
    results = []
    for path in ("loop", "padded"):
        module = build(path)
        if module.b1 is not None:
            with torch.no_grad():
                module.b1.normal_(generator=torch.Generator().manual_seed(2))
                module.b2.normal_(generator=torch.Generator().manual_seed(3))
        x_ = x.clone().requires_grad_()
        y = module(x_, tokens_per_expert, counts_host)
        y.backward(grad)
        results.append([y, x_.grad, *(p.grad for p in module.parameters())])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    return results


@pytest.mark.parametrize("padding", [0, 3], ids=["no-padding", "padding-rows"])
@pytest.mark.parametrize("counts_form", ["list", "tensor", "host"], ids=["list", "device-tensor", "counts-host"])
def test_padded_equals_the_loop_on_grouped_rows(padding: int, counts_form: str) -> None:
    """The experts module alone, on rows grouped by expert: an idle expert, padding rows past the
    counts (zero output, zero gradient), the counts as a list, as a device tensor, or read already."""
    torch.manual_seed(1)
    counts = [4, 0, 3, 1]
    x = torch.randn(sum(counts) + padding, 6, dtype=torch.float64)
    grad = torch.randn_like(x)
    tokens_per_expert = counts if counts_form == "list" else torch.tensor(counts)
    counts_host = counts if counts_form == "host" else None

    def build(path: str) -> GroupedExperts:
        return GroupedExperts(4, 6, 10, expert_gemm=path, init_std=0.3, bias=True).double()

    results = _padded_equals_loop(build, x, tokens_per_expert, grad, counts_host)
    assert torch.count_nonzero(results[1][2][1]) == 0  # the idle expert's w1 gradient
    if padding:
        assert torch.count_nonzero(results[1][0][sum(counts) :]) == 0
        assert torch.count_nonzero(results[1][1][sum(counts) :]) == 0


@pytest.mark.parametrize("seed", range(10))
def test_padded_runs_of_any_size_equal_the_loop(seed: int, monkeypatch) -> None:
    """The padded path split into runs of experts (one expert per run up to all in one), padding rows
    or none, idle experts anywhere, against the loop on the same rows."""
    rng = random.Random(seed)
    experts, hidden, ffn = rng.choice([3, 5, 9]), rng.choice([4, 6]), rng.choice([3, 10])
    activation = rng.choice(["gelu", "swiglu", "silu"])
    counts = [rng.choice([0, 1, 2, 5, 7]) for _ in range(experts)]
    counts[rng.randrange(experts)] = rng.randint(1, 6)  # at least one expert with rows
    width = max(hidden, 2 * ffn if activation == "swiglu" else ffn)
    monkeypatch.setattr(padded_module, "PADDED_RUN_BYTES", rng.choice([1, 3, 12, 10**6]) * width * 8)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts) + rng.choice([0, 2]), hidden, generator=gen, dtype=torch.float64)
    grad = torch.randn_like(x)

    def build(path: str) -> GroupedExperts:
        bias = seed % 2 == 0
        return GroupedExperts(experts, hidden, ffn, activation, bias=bias, expert_gemm=path, init_std=0.3).double()

    _padded_equals_loop(build, x, counts, grad)


@pytest.mark.parametrize("seed", range(20))
def test_padded_runs_cover_the_active_experts_in_runs_within_budget(seed: int) -> None:
    rng = random.Random(seed)
    counts = [rng.choice([0, 0, 1, 3, 8, 40]) for _ in range(rng.randint(1, 30))]
    width, elem, budget = rng.choice([4, 64]), rng.choice([2, 4]), rng.choice([1, 512, 4096, 1 << 20])
    runs = padded_runs(counts, width, elem, budget)
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
        y_r, aux_r = naive_moe(oracle, x_r)  # capacity from the rank's own tokens
        ((y_r * gs[r]).sum() + aux_r).backward()
        for n, p in oracle.experts.named_parameters():
            if p.grad is not None:
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
    """The loop writes its input gradient over the output gradient the dispatcher hands it
    (``owns_output_grad``); the shared expert, whose output gradient is shared, must not."""
    run_distributed(_ep2_paths_equal_oracle, 2, "loop", cfg_kwargs)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("path", ["loop", "padded"])
def test_owning_the_output_gradient_writes_the_input_gradient_over_it(path: str, seed: int) -> None:
    """Grouped rows with ``owns_output_grad``: the same gradients as with a buffer of their own, and the
    input gradient is the output gradient's memory (one ``[N, D]`` buffer less at backward's peak)."""
    rng = random.Random(seed)
    experts_count, dim, ffn = rng.choice([1, 3, 6]), rng.choice([4, 9]), rng.choice([3, 12])
    counts = [rng.choice([0, 1, 4, 7]) for _ in range(experts_count)]
    rows = sum(counts) + rng.choice([0, 2])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    grad = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    kwargs = dict(activation=rng.choice(["gelu", "swiglu", "relu"]), bias=rng.random() < 0.5, init_std=0.4)
    results = []
    for owns in (False, True):
        experts = GroupedExperts(experts_count, dim, ffn, expert_gemm=path, **kwargs).double()
        experts.owns_output_grad = owns
        x_ = x.clone().requires_grad_()
        grad_ = grad.clone()
        experts(x_, counts).backward(grad_)
        if owns:  # the gradient handed in now holds the input gradient (a leaf's .grad is a copy of it)
            assert torch.equal(grad_, x_.grad)
        else:
            assert torch.equal(grad_, grad)
        results.append([x_.grad, *(p.grad for p in experts.parameters())])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_layer_lets_only_its_routed_experts_own_their_output_gradient() -> None:
    """The dispatcher consumes the routed experts' output alone at every EP size; the shared expert's
    output is added to it, so its gradient is shared."""
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=6, num_experts=4, shared_expert_ffn_hidden_size=4)
    single = MoELayer(cfg)
    expert_parallel = MoELayer(cfg, ep_size=2)  # its group is bound later
    assert single.experts.owns_output_grad and expert_parallel.experts.owns_output_grad
    assert not single.shared_expert.owns_output_grad
    assert not expert_parallel.shared_expert.owns_output_grad


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


def test_cost_model_prices_the_padding_at_the_routings_imbalance() -> None:
    """A padded run computes every expert at its busiest expert's rows: the choice, made from a
    balanced step before any routing, prices the padding at the assumed imbalance."""
    model = ExpertCostModel()
    four = [256] * 4  # the EP=2 ranks of benchmarks/bench_models.py: 4 local experts of 128 x 256
    assert model.padded_s(four, 128, 256, 4) < model.loop_s(four, 128, 256, 4)  # balanced, padding would win
    assert model.choose(four, 128, 256) == "loop"
    assert model.padded_s(four, 128, 256, 4, model.imbalance) > model.padded_s(four, 128, 256, 4)
    rng = random.Random(3)
    for _ in range(20):
        counts = [rng.randint(1, 300) for _ in range(rng.randint(1, 16))]
        low = model.padded_s(counts, 64, 128, 4)
        assert low <= model.padded_s(counts, 64, 128, 4, 1.5) <= model.padded_s(counts, 64, 128, 4, 3.0)
    # A lone expert never pads, however unbalanced the routing.
    assert model.padded_s([500], 64, 128, 4, 3.0) == model.padded_s([500], 64, 128, 4)
    assert dataclasses.replace(model, imbalance=1.0).choose(four, 128, 256) == "padded"


# --------------------------------------------------------------------------- the path choice


@pytest.fixture
def no_timing(monkeypatch):
    """Every way the choice could time a kernel fails the test; the expert kernels' calls are counted."""
    monkeypatch.delenv(COST_FILE_ENV, raising=False)

    def timed(*args, **kwargs):
        raise AssertionError("the path choice timed something")

    monkeypatch.setattr(choice, "_median_s", timed)
    monkeypatch.setattr(choice, "_expert_step_s", timed)
    monkeypatch.setattr(choice, "calibrate", timed)
    monkeypatch.setattr(choice.time, "perf_counter", timed)
    calls: list[str] = []
    for mlp in (LoopExpertMLP, PaddedExpertMLP):
        monkeypatch.setattr(mlp, "apply", _recording(mlp.apply, calls, mlp.__name__))
    return calls


def _recording(apply, log: list, name: str):
    def wrapped(*args):
        log.append(name)
        return apply(*args)

    return wrapped


@pytest.mark.parametrize("seed", range(6))
def test_the_choice_is_a_function_of_the_shape(seed: int, no_timing) -> None:
    """The same counts and sizes give the same path, every time and from any module, with nothing run
    or timed; ``auto`` resolves once, from the rows a balanced step gives each expert."""
    rng = random.Random(seed)
    hidden, ffn = rng.choice([16, 64, 128]), rng.choice([16, 128, 256])
    experts = rng.choice([4, 8]) if seed % 2 else rng.choice([8, 64, 128])
    activation = rng.choice(["gelu", "swiglu"])
    busy = seed % 2  # thousands of rows per expert (the loop, mostly) or a few (padding, mostly)
    low, high = (2000, 4000) if busy else (1, 40)
    counts = [rng.randint(low, high) for _ in range(experts)]
    first = choose_expert_path(counts, hidden, ffn, activation)
    assert all(choose_expert_path(list(counts), hidden, ffn, activation) == first for _ in range(5))
    assert first == DEFAULT_COST_MODEL.choose(counts, hidden, ffn)

    rows = rng.randint(low, high)
    balanced = choose_expert_path([rows] * experts, hidden, ffn, activation)
    layer = GroupedExperts(experts, hidden, ffn, activation, bias=True)
    params_before = [p.detach().clone() for p in layer.parameters()]
    x, one_row = torch.randn(rows * experts, hidden), torch.randn(1, hidden)
    torch.manual_seed(11)
    rng_before = torch.get_rng_state()
    assert layer.execution_path(x) == balanced and layer.resolved_gemm is None  # asking fixes nothing
    assert layer.resolve_path(x, rows) == balanced == layer.resolved_gemm
    assert layer.execution_path(one_row) == balanced  # fixed from now on, whatever the rows of later steps
    assert layer.needs_host_counts(x) and not layer.uses_grouped_gemm(x)
    assert GroupedExperts(experts, hidden, ffn, activation).resolve_path(x, rows) == balanced
    assert not no_timing  # no kernel ran
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(p.grad is None for p in layer.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params_before, layer.parameters()))


def test_large_experts_take_the_loop_whatever_the_model(no_timing) -> None:
    # Experts of 4096 x 16384: each streams 512 MiB of weights per product; padding saves nothing.
    few_rows = [2] * 64
    assert DEFAULT_COST_MODEL.choose(few_rows, 4096, 16384) == "padded"
    assert choose_expert_path(few_rows, 4096, 16384) == "loop"
    gen = random.Random(0)
    busy = [gen.randint(2600, 3200) for _ in range(16)]  # the model: the loop
    assert choose_expert_path(busy, 256, 128) == "loop"
    assert choose_expert_path([0, 0, 0], 8, 8) == "loop"
    assert choose_expert_path([16] * 128, 256, 128) == "padded"


def _write_cost_file(tmp_path, name: str, **overrides) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({**dataclasses.asdict(DEFAULT_COST_MODEL), **overrides}))
    return str(path)


def test_a_pinned_calibration_file_decides(tmp_path, monkeypatch, no_timing) -> None:
    counts, hidden, ffn = [16] * 128, 256, 128  # the defaults: padded
    assert choose_expert_path(counts, hidden, ffn) == "padded"
    slow_padding = _write_cost_file(tmp_path, "slow.json", padded_call_s=10.0)
    monkeypatch.setenv(COST_FILE_ENV, slow_padding)
    assert choice.cost_model() == dataclasses.replace(DEFAULT_COST_MODEL, padded_call_s=10.0)
    assert choose_expert_path(counts, hidden, ffn) == "loop"
    cheap_padding = _write_cost_file(tmp_path, "cheap.json", padded_call_s=0.0, expert_call_s=1.0)
    monkeypatch.setenv(COST_FILE_ENV, cheap_padding)
    assert choose_expert_path([4000, 4000], 64, 64) == "padded"  # the defaults: the loop
    monkeypatch.setenv(COST_FILE_ENV, "")  # set but empty: the defaults
    assert choice.cost_model() == DEFAULT_COST_MODEL
    assert not no_timing


def test_a_layer_resolves_its_path_once_under_the_calibration_in_force(tmp_path, monkeypatch, no_timing) -> None:
    """A layer's path is fixed at its first forward: a calibration file set later changes the path of
    layers built after it, never of one that already ran (a run never switches kernels)."""
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=8, top_k=2, init_std=0.3)
    monkeypatch.setenv(COST_FILE_ENV, _write_cost_file(tmp_path, "padded.json", padded_call_s=0.0, expert_call_s=1.0))
    early = MoELayer(cfg)
    x = torch.randn(32, 8)
    early(x)
    assert early.experts.resolved_gemm == "padded" and no_timing == ["PaddedExpertMLP"]
    # The rows of a balanced step: ceil(T * k / E) per expert, as on every rank.
    assert choose_expert_path([-(-32 * 2 // 8)] * 8, 8, 16) == "padded"
    monkeypatch.setenv(COST_FILE_ENV, _write_cost_file(tmp_path, "loop.json", padded_call_s=10.0))
    early(torch.randn(5, 8))
    late = MoELayer(cfg)
    late(x)
    assert early.experts.resolved_gemm == "padded" and late.experts.resolved_gemm == "loop"
    assert no_timing == ["PaddedExpertMLP", "PaddedExpertMLP", "LoopExpertMLP"]


@pytest.mark.parametrize(
    "content, why",
    [(None, "No such file"), ("{not json", "Expecting"), ('{"gemm_flops": 1e11}', "expert_call_s"), ("[1, 2]", "")],
    ids=["missing", "not-json", "missing-field", "not-a-mapping"],
)
def test_a_broken_calibration_file_fails_naming_the_variable(tmp_path, monkeypatch, content, why) -> None:
    path = tmp_path / "cost.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv(COST_FILE_ENV, str(path))
    message = rf"{COST_FILE_ENV}={path} is not a readable calibration file.*{why}.*calibrate PATH"
    with pytest.raises(ValueError, match=message):
        choose_expert_path([16] * 128, 256, 128)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4))  # auto on a CPU
    with pytest.raises(ValueError, match=COST_FILE_ENV):
        layer(torch.randn(8, 8))
    # A forced path reads no calibration.
    MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, expert_gemm="loop"))(torch.randn(8, 8))


def test_calibrate_writes_a_file_that_loads(tmp_path, monkeypatch) -> None:
    """``python -m moe_parallel.experts.choice calibrate PATH`` (its main, at small sizes here): the file
    it writes is one that ``MOE_PARALLEL_EXPERT_COST`` pins."""
    real = choice.calibrate
    monkeypatch.setattr(choice, "calibrate", lambda: real(reps=1, hidden=64, ffn=64))
    path = tmp_path / "cost.json"
    assert choice.main(["calibrate", str(path)]) == 0
    monkeypatch.setenv(COST_FILE_ENV, str(path))
    model = choice.cost_model()
    assert model.gemm_flops > 0 and model.move_bytes_per_s > 0
    assert model.expert_call_s > 0 and model.padded_call_s > 0 and model.expert_rows >= 0
    assert choose_expert_path([16] * 128, 256, 128) in ("loop", "padded")
    assert choice.main(["calibrate"]) == 2 and choice.main([]) == 2  # usage


@pytest.mark.parametrize("reentrant", [False, True])
def test_auto_resolves_inside_activation_checkpointing(reentrant: bool) -> None:
    """The first step resolves the path inside a checkpointed forward (saved-tensor hooks, or no grad):
    the recomputation takes the same path, and the gradients equal an unchecked step's."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=32, ffn_hidden_size=32, num_experts=128, top_k=2, capacity_factor=2.0))
    x = torch.randn(512, 32, requires_grad=True)
    checkpoint(layer, x, use_reentrant=reentrant).sum().backward()
    assert layer.experts.resolved_gemm in ("loop", "padded")
    checked = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    layer(x).sum().backward()
    for a, b in zip(checked, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b)


def test_expert_gemm_forces_a_path() -> None:
    x = torch.zeros(4, 8)
    assert GroupedExperts(2, 8, 8, expert_gemm="loop").execution_path(x) == "loop"
    assert GroupedExperts(2, 8, 8, expert_gemm="padded").execution_path(x) == "padded"
    assert GroupedExperts(2, 8, 8, expert_gemm="grouped").execution_path(x) == "grouped"  # torch's CPU kernel
    padded = GroupedExperts(2, 8, 8, expert_gemm="padded")
    assert torch.count_nonzero(padded(x, [0, 0])) == 0  # nothing to pad: no rows, zero output
    with pytest.raises(MoEConfigError, match=r"moe\.expert_gemm='bmm'.*padded"):
        MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2, expert_gemm="bmm")


@pytest.mark.parametrize("budget_rows", [1, 10**6], ids=["one-expert-per-run", "one-run"])
def test_padded_gradcheck(budget_rows: int, monkeypatch) -> None:
    """Finite differences through the padded path's hand-written backward (SwiGLU, biases, an idle
    expert, a padding row), in runs of one expert or all of them in one."""
    monkeypatch.setattr(padded_module, "PADDED_RUN_BYTES", budget_rows * 6 * 8)
    torch.manual_seed(4)
    counts = [2, 0, 3, 1]
    x = torch.randn(sum(counts) + 1, 4, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 4, 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, w1, w2, b1, b2):
        return PaddedExpertMLP.apply(x, w1, w2, b1, b2, counts, "swiglu")

    assert torch.autograd.gradcheck(fn, (x, w1, w2, b1, b2))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("path", ["loop", "padded"])
def test_a_second_backward_through_a_retained_graph_recomputes_what_the_first_freed(path: str, seed: int) -> None:
    """Both CPU paths free their saved pre-activations during backward; a retained graph still works."""
    kwargs = _draw(seed)
    torch.manual_seed(seed)
    layer = _layer(path, kwargs)
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
def test_top1_dropped_tokens_get_exact_zeros(path: str) -> None:
    """Dropped tokens' rows are exact zeros. Freed NaN-filled memory of the same size beforehand makes a
    row that no one wrote visible."""
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


def test_asking_for_the_path_fixes_nothing_and_a_move_resolves_again():
    """Only a forward (or ``resolve_expert_path``) fixes the path, from the layer's balanced rows;
    queries before it leave it open, and ``.to()`` opens it again (another device may take the
    grouped GEMM)."""
    cfg = MoEConfig(hidden_size=64, ffn_hidden_size=64, num_experts=16, top_k=8)
    x = torch.randn(512, 64)
    asked = MoELayer(cfg)
    asked.experts.needs_host_counts(x)
    asked.experts.execution_path(x)
    assert asked.experts.resolved_gemm is None
    asked(x)
    fresh = MoELayer(cfg)
    fresh(x)
    assert asked.experts.resolved_gemm == fresh.experts.resolved_gemm is not None
    fresh.to(torch.float64)
    assert fresh.experts.resolved_gemm is None
    fresh(x.double())
    assert fresh.experts.resolved_gemm in ("loop", "padded")
