"""The MoE options of DeepSeek-V2, Llama 4 and GPT-OSS against a dense reference written here.

``router_bias`` (the gate's trained bias), ``group_score`` ("top2_sum" / "max"), ``input_weighted``
(the combine weight scales the expert's input), ``activation="clamped_swiglu"`` and ``expert_bias``
(GPT-OSS semantics: the combine weight multiplies the whole expert output, bias included). The
reference loops over tokens and their experts in float64 and knows nothing of the layer's plan,
dispatcher or kernels; forward and gradients (input, router weight and bias, every expert
parameter) are compared over random draws of sizes, top_k and capacity factors, on every expert path
(grouped, loop, padded), at EP = 1 and EP = 2 (gloo). The activation's backward, in place and not,
is checked against autograd of the plain formula; a checkpoint keeps the router bias.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_parallel import MoEConfig, MoEConfigError, MoELayer, expert_capacity
from moe_parallel.experts.activations import SwiGLUClamp, activate, activate_backward, activate_for_backward
from tests.dist_utils import run_distributed
from tests.reference import naive_top_k

PATHS = ("grouped", "loop", "padded")


# -- the reference ----------------------------------------------------------------------------------


def reference_activation(h: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    if cfg.activation in ("swiglu", "clamped_swiglu"):
        half = h.shape[-1] // 2
        gate, up = h[..., :half], h[..., half:]
        if cfg.activation == "swiglu":
            return gate * torch.sigmoid(gate) * up
        limit, alpha = cfg.swiglu_limit, cfg.swiglu_alpha
        gate = torch.clamp(gate, max=limit)
        up = torch.clamp(up, min=-limit, max=limit)
        return (up + 1) * gate * torch.sigmoid(alpha * gate)
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[cfg.activation](h)


def reference_route(params: dict, cfg: MoEConfig, x_D: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """One token's experts (best first) and their (differentiable) combine weights."""
    logits = params["router.weight"] @ x_D
    if params.get("router.bias") is not None:
        logits = logits + params["router.bias"]
    return naive_top_k(cfg, logits)


def reference_keep(experts: list[list[int]], weights: list[list[float]], cfg: MoEConfig) -> set[tuple[int, int]]:
    """The kept (token, choice) pairs: each expert's queue (first choices in token order, then second
    choices, ...; by descending weight for ``drop_policy="probs"``) cut at the capacity."""
    num_tokens = len(experts)
    capacity = expert_capacity(num_tokens, cfg.top_k, cfg.num_experts, cfg.capacity_factor, cfg.min_capacity)
    kept = set()
    for e in range(cfg.num_experts):
        queue = [(t, k) for k in range(cfg.top_k) for t in range(num_tokens) if experts[t][k] == e]
        if cfg.drop_policy == "probs":
            queue.sort(key=lambda tk: -weights[tk[0]][tk[1]])
        kept.update(queue if capacity is None else queue[:capacity])
    return kept


def reference_moe(params: dict, cfg: MoEConfig, x_TD: torch.Tensor) -> torch.Tensor:
    """The layer's output on ``x_TD``, token by token and expert by expert (training-mode capacity)."""
    routes = [reference_route(params, cfg, x_D) for x_D in x_TD]
    experts = [chosen for chosen, _ in routes]
    kept = reference_keep(experts, [w.tolist() for _, w in routes], cfg)
    rows = []
    for t, (chosen, weights) in enumerate(routes):
        y_D = torch.zeros_like(x_TD[t])
        for k, e in enumerate(chosen):
            if (t, k) not in kept:
                continue
            x_D = x_TD[t] * weights[k] if cfg.input_weighted else x_TD[t]
            h = x_D @ params["experts.w1"][e]
            if cfg.expert_bias:
                h = h + params["experts.b1"][e]
            out = reference_activation(h, cfg) @ params["experts.w2"][e]
            if cfg.expert_bias:
                out = out + params["experts.b2"][e]
            y_D = y_D + (out if cfg.input_weighted else weights[k] * out)
        rows.append(y_D)
    return torch.stack(rows) if rows else x_TD * 0


# -- draws and helpers ------------------------------------------------------------------------------


def draw(seed: int) -> tuple[dict, str]:
    """A random config over the new options (and the router options they meet) and an expert path."""
    rng = random.Random(seed)
    num_experts = rng.choice([4, 8])
    num_groups = rng.choice([1, 1, 2, 4])
    topk_groups = rng.randint(1, num_groups)
    top_k = rng.randint(1, min(3, topk_groups * num_experts // num_groups))
    score_func = rng.choice(["softmax", "sigmoid"])
    activation = rng.choice(["clamped_swiglu", "clamped_swiglu", "swiglu", "gelu", "relu"])
    kwargs = dict(
        hidden_size=rng.choice([4, 8]),
        ffn_hidden_size=rng.choice([3, 6]),
        num_experts=num_experts,
        top_k=top_k,
        score_func=score_func,
        score_after_topk=score_func == "softmax" and rng.random() < 0.3,
        normalize_top_k=rng.random() < 0.7,
        num_groups=num_groups,
        topk_groups=topk_groups,
        group_score=rng.choice(["top2_sum", "max"]),
        routed_scaling_factor=rng.choice([1.0, 2.5]),
        router_bias=rng.random() < 0.6,
        input_weighted=rng.random() < 0.5,
        activation=activation,
        swiglu_limit=rng.choice([0.5, 1.0, 7.0]),  # small limits clamp many entries
        swiglu_alpha=rng.choice([1.702, 0.8]),
        expert_bias=rng.random() < 0.6,
        capacity_factor=rng.choice([None, 0.5, 1.0, 2.0]),
        drop_policy=rng.choice(["position", "probs"]),
        min_capacity=rng.choice([0, 2]),
        aux_loss_coeff=0.0,
        init_std=0.5,
        init_seed=rng.randint(0, 10**6),
    )
    return kwargs, rng.choice(PATHS)


def dtype_of(path: str) -> torch.dtype:
    return torch.float32 if path == "grouped" else torch.float64  # the grouped GEMM takes float32 on CPU


def tolerance(path: str) -> dict:
    # The router computes in float32 whatever the layer's dtype; the reference in float64.
    return dict(rtol=2e-4, atol=2e-5) if path == "grouped" else dict(rtol=2e-5, atol=2e-6)


def build_layer(cfg: MoEConfig, dtype: torch.dtype, seed: int, ep_group=None) -> MoELayer:
    """The layer with its zero-initialised biases drawn (the same on every rank), as the full EP=1
    layer would hold them; at EP > 1 each rank keeps its experts' slice."""
    layer = MoELayer(cfg, ep_group=ep_group).to(dtype).train()
    full = MoELayer(cfg)  # every expert, seeded by global id
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if full.router.bias is not None:
            full.router.bias.normal_(0.0, 0.5, generator=gen)
        for param in (full.experts.b1, full.experts.b2):
            if param is not None:
                param.normal_(0.0, 0.5, generator=gen)
        first, count = layer.experts.first_expert_id, layer.num_local_experts
        for name, param in layer.named_parameters():
            value = full.get_parameter(name)
            param.copy_(value[first : first + count] if name.startswith("experts.") else value)
    return layer


def reference_params(layer: MoELayer) -> dict:
    """float64 leaves of the full layer's parameters (EP = 1), by their names in the layer."""
    return {n: p.detach().double().clone().requires_grad_() for n, p in layer.named_parameters()}


def global_params(cfg: MoEConfig, seed: int) -> dict:
    return reference_params(build_layer(cfg, torch.float64, seed))


def assert_grads_close(got: torch.Tensor | None, want: torch.Tensor | None, like: torch.Tensor, tol: dict, msg: str):
    got = torch.zeros_like(like) if got is None else got
    want = torch.zeros_like(like) if want is None else want
    torch.testing.assert_close(got.double(), want.double(), **tol, msg=msg)


# -- EP = 1 -----------------------------------------------------------------------------------------


def check_ep1(seed: int, path: str | None = None) -> None:
    kwargs, drawn_path = draw(seed)
    path = path or drawn_path
    cfg = MoEConfig(**kwargs, expert_gemm=path)
    dtype = dtype_of(path)
    layer = build_layer(cfg, dtype, seed)
    params = reference_params(layer)
    gen = torch.Generator().manual_seed(seed)
    tokens = random.Random(seed).choice([1, 6, 13, 24])
    x_TD = torch.randn(tokens, cfg.hidden_size, generator=gen, dtype=torch.float64)
    g_TD = torch.randn(tokens, cfg.hidden_size, generator=gen, dtype=torch.float64)

    x = x_TD.to(dtype, copy=True).requires_grad_()
    y = layer(x)
    (y * g_TD.to(dtype)).sum().backward()
    x_ref = x_TD.clone().requires_grad_()
    y_ref = reference_moe(params, cfg, x_ref)
    (y_ref * g_TD).sum().backward()

    tol = tolerance(path)
    torch.testing.assert_close(y.double(), y_ref.detach(), **tol)
    assert_grads_close(x.grad, x_ref.grad, x_ref, tol, "input")
    for name, param in layer.named_parameters():
        assert_grads_close(param.grad, params[name].grad, params[name], tol, name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(10))
def test_options_equal_the_reference_at_ep1(seed: int, path: str) -> None:
    check_ep1(seed, path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 160))
def test_options_equal_the_reference_at_ep1_sweep(seed: int) -> None:
    check_ep1(seed)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(input_weighted=True, capacity_factor=0.5, min_capacity=0),  # many drops
        dict(input_weighted=True, activation="clamped_swiglu", swiglu_limit=0.5, expert_bias=True),
        dict(router_bias=True, score_after_topk=True, activation="clamped_swiglu", expert_bias=True),  # GPT-OSS
        dict(input_weighted=True, top_k=1, score_func="sigmoid", capacity_factor=None),  # Llama 4
        dict(num_groups=4, topk_groups=2, group_score="max", top_k=3, capacity_factor=None),  # DeepSeek-V2
    ],
    ids=["input-weighted-drops", "input-weighted-clamped-bias", "gpt-oss", "llama4", "deepseek-v2"],
)
@pytest.mark.parametrize("path", PATHS)
def test_model_shaped_configs_equal_the_reference(kwargs: dict, path: str) -> None:
    base = dict(
        hidden_size=8, ffn_hidden_size=6, num_experts=8, top_k=2, aux_loss_coeff=0.0, init_std=0.5, min_capacity=0
    )
    cfg = MoEConfig(**{**base, **kwargs}, expert_gemm=path)
    dtype = dtype_of(path)
    layer = build_layer(cfg, dtype, 5)
    params = reference_params(layer)
    gen = torch.Generator().manual_seed(3)
    x_TD, g_TD = (torch.randn(20, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    x = x_TD.to(dtype, copy=True).requires_grad_()
    (layer(x) * g_TD.to(dtype)).sum().backward()
    x_ref = x_TD.clone().requires_grad_()
    y_ref = reference_moe(params, cfg, x_ref)
    (y_ref * g_TD).sum().backward()
    tol = tolerance(path)
    assert_grads_close(x.grad, x_ref.grad, x_ref, tol, "input")
    for name, param in layer.named_parameters():
        assert_grads_close(param.grad, params[name].grad, params[name], tol, name)
    if cfg.router_bias:
        assert layer.router.bias.grad.abs().sum() > 0  # the router bias is trained


def test_input_weighted_output_is_not_scaled_after_the_experts() -> None:
    """With one expert and top-1 softmax the weight is 1 either way; with sigmoid scores it is not,
    and an expert with a bias tells the two apart: ``b2`` is added unweighted."""
    common = dict(hidden_size=4, ffn_hidden_size=3, num_experts=1, top_k=1, score_func="sigmoid")
    common.update(expert_bias=True, capacity_factor=None, aux_loss_coeff=0.0, activation="relu", expert_gemm="loop")
    weighted_in = MoELayer(MoEConfig(**common, input_weighted=True)).double()
    weighted_out = MoELayer(MoEConfig(**common)).double()
    with torch.no_grad():
        for layer in (weighted_in, weighted_out):
            layer.experts.b2.fill_(1.0)
            layer.experts.w2.zero_()
    x = torch.randn(5, 4, dtype=torch.float64)
    weight = torch.sigmoid(x.float() @ weighted_out.router.weight.float().t()).double()
    torch.testing.assert_close(weighted_in(x), torch.ones(5, 4, dtype=torch.float64))
    torch.testing.assert_close(weighted_out(x), weight.expand(5, 4), rtol=1e-6, atol=1e-7)


# -- EP = 2 -----------------------------------------------------------------------------------------


def _ep2_equals_reference(rank: int, world: int, seeds: list[int]) -> None:
    for seed in seeds:
        kwargs, path = draw(seed)
        cfg = MoEConfig(**kwargs, expert_gemm=path)
        dtype = dtype_of(path)
        layer = build_layer(cfg, dtype, seed, ep_group=dist.group.WORLD)
        params = global_params(cfg, seed)
        rng = random.Random(seed)
        tokens = [rng.choice([0, 5, 11, 16]) for _ in range(world)]
        gen = torch.Generator().manual_seed(seed)
        xs = [torch.randn(n, cfg.hidden_size, generator=gen, dtype=torch.float64) for n in tokens]
        gs = [torch.randn(n, cfg.hidden_size, generator=gen, dtype=torch.float64) for n in tokens]

        # The reference: each rank's shard through the full EP = 1 model (capacity from the shard's
        # own tokens); expert gradients summed over the shards, everything else of this rank's shard.
        expert_grads: dict[str, torch.Tensor] = {}
        for r in range(world):
            for p in params.values():
                p.grad = None
            x_r = xs[r].clone().requires_grad_()
            y_r = reference_moe(params, cfg, x_r)
            (y_r * gs[r]).sum().backward()
            for name, p in params.items():
                if name.startswith("experts.") and p.grad is not None:
                    expert_grads[name] = expert_grads.get(name, 0) + p.grad
            if r == rank:
                want_y, want_gx = y_r.detach(), x_r.grad
                want_router = {n: p.grad for n, p in params.items() if n.startswith("router.")}

        x = xs[rank].to(dtype, copy=True).requires_grad_()
        y = layer(x)
        (y * gs[rank].to(dtype)).sum().backward()
        tol = tolerance(path)
        msg = f"seed {seed}, path {path}, {kwargs}"
        torch.testing.assert_close(y.double(), want_y, **tol, msg=msg)
        assert_grads_close(x.grad, want_gx, xs[rank], tol, msg)
        first, count = layer.experts.first_expert_id, layer.num_local_experts
        for name, param in layer.named_parameters():
            if name.startswith("experts."):
                want = expert_grads.get(name)
                want = None if want is None else want[first : first + count]
            else:
                want = want_router.get(name)
            assert_grads_close(param.grad, want, param.detach().double(), tol, f"{name}: {msg}")


def test_options_equal_the_reference_at_ep2() -> None:
    run_distributed(_ep2_equals_reference, 2, list(range(200, 208)), timeout=240)


@pytest.mark.slow
def test_options_equal_the_reference_at_ep2_sweep() -> None:
    run_distributed(_ep2_equals_reference, 2, list(range(300, 360)), timeout=600)


# -- the activation ---------------------------------------------------------------------------------


def plain_clamped_swiglu(h: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@pytest.mark.parametrize("seed", range(6))
def test_clamped_swiglu_forward_and_backward_equal_autograd_of_the_formula(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    limit, alpha = [(7.0, 1.702), (1.0, 1.702), (0.3, 0.5)][seed % 3]
    clamp = SwiGLUClamp(limit, alpha)
    rows, ffn = 1 + seed * 3, 2 + seed
    # Most entries beyond +-limit on some rows, within on others.
    h = torch.randn(rows, 2 * ffn, generator=gen, dtype=torch.float64) * (3 * limit) * (1 + seed % 2)
    grad_a = torch.randn(rows, ffn, generator=gen, dtype=torch.float64)
    leaf = h.clone().requires_grad_()
    want_a = plain_clamped_swiglu(leaf, limit, alpha)
    (want_h,) = torch.autograd.grad(want_a, leaf, grad_a)
    assert (h.abs() > limit).any() and (h.abs() < limit).any()

    torch.testing.assert_close(activate(h, "clamped_swiglu", clamp), want_a.detach(), rtol=1e-14, atol=1e-14)
    a, glu = activate_for_backward(h, "clamped_swiglu", clamp)
    torch.testing.assert_close(a, want_a.detach(), rtol=1e-14, atol=1e-14)
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(activate_backward(grad_a, h, "clamped_swiglu", clamp=clamp), want_h, **tol)
    torch.testing.assert_close(
        activate_backward(grad_a, h, "clamped_swiglu", gate_act=glu.clone(), clamp=clamp), want_h, **tol
    )
    # In place: the gradient lands in h's memory (grad_a and the gate's activation are consumed).
    for gate_act in (glu.clone(), None):
        h_buf, grad_buf = h.clone(), grad_a.clone()
        got = activate_backward(grad_buf, h_buf, "clamped_swiglu", in_place=True, gate_act=gate_act, clamp=clamp)
        assert got.data_ptr() == h_buf.data_ptr()
        torch.testing.assert_close(got, want_h, **tol)


def test_clamped_swiglu_passes_gradient_on_the_closed_interval_like_torch_clamp() -> None:
    limit = 2.0
    h = torch.tensor([[limit, limit + 1.0, -limit, limit], [-5.0, 0.5, limit, -limit - 1e-3]], dtype=torch.float64)
    leaf = h.clone().requires_grad_()
    (want,) = torch.autograd.grad(plain_clamped_swiglu(leaf, limit, 1.702).sum(), leaf)
    clamp = SwiGLUClamp(limit, 1.702)
    ones = torch.ones(2, 2, dtype=torch.float64)
    torch.testing.assert_close(activate_backward(ones, h, "clamped_swiglu", clamp=clamp), want)
    got = activate_backward(ones.clone(), h.clone(), "clamped_swiglu", in_place=True, clamp=clamp)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("path", ["loop", "padded"])
def test_clamped_swiglu_experts_gradcheck(path: str) -> None:
    """torch's numerical gradcheck through the CPU paths' hand-written backward (float64)."""
    from moe_parallel.experts import LoopExpertMLP, PaddedExpertMLP

    mlp = LoopExpertMLP if path == "loop" else PaddedExpertMLP
    gen = torch.Generator().manual_seed(0)
    counts, dim, ffn = [3, 0, 4], 5, 3
    x = torch.randn(sum(counts) + 2, dim, generator=gen, dtype=torch.float64)  # 2 padding rows
    w1 = torch.randn(3, dim, 2 * ffn, generator=gen, dtype=torch.float64)
    w2 = torch.randn(3, ffn, dim, generator=gen, dtype=torch.float64)
    b1 = torch.randn(3, 2 * ffn, generator=gen, dtype=torch.float64)
    b2 = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    clamp = SwiGLUClamp(1.5, 1.702)  # |h| ~ 2.5: many entries beyond the limit, none within 1e-6 of it
    inputs = [t.requires_grad_() for t in (x, w1, w2, b1, b2)]

    def run(*args):
        return mlp.apply(*args, counts, "clamped_swiglu", False, clamp)

    assert torch.autograd.gradcheck(run, inputs, eps=1e-7, atol=1e-6)


# -- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("router_bias", "yes"),
        ("input_weighted", 1),
        ("group_score", "sum"),
        ("swiglu_limit", 0.0),
        ("swiglu_limit", float("inf")),
        ("swiglu_alpha", -1.0),
        ("swiglu_alpha", True),
        ("activation", "geglu"),
    ],
)
def test_bad_values_name_the_field(field: str, value) -> None:
    with pytest.raises(MoEConfigError, match=rf"moe\.{field}=.* is invalid: "):
        MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=4, **{field: value})


def test_router_bias_is_a_float32_parameter_beside_the_weight() -> None:
    cfg = MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=4, router_bias=True, expert_bias=True)
    layer = MoELayer(cfg).bfloat16()
    names = dict(layer.named_parameters())
    assert names["router.bias"].shape == (4,) and torch.count_nonzero(names["router.bias"]) == 0
    assert names["experts.b1"].shape == (4, 4) and names["experts.b2"].shape == (4, 4)
    plain = MoELayer(MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=4))
    assert [name for name, _ in plain.router.named_parameters()] == ["weight"]
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
    route = layer.router(torch.randn(6, 4).bfloat16())
    assert route.logits_TE.dtype == torch.float32
    assert (route.expert_TK[:, 0] == 3).all()  # the bias enters the logits, hence selection


def test_clamped_swiglu_experts_are_twice_as_wide() -> None:
    cfg = MoEConfig(hidden_size=4, ffn_hidden_size=5, num_experts=2, top_k=1, activation="clamped_swiglu",
                    shared_expert_ffn_hidden_size=3)  # fmt: skip
    layer = MoELayer(cfg)
    assert layer.experts.w1.shape == (2, 4, 10) and layer.experts.w2.shape == (2, 5, 4)
    assert layer.shared_expert.w1.shape == (1, 4, 6) and layer.shared_expert.activation == "clamped_swiglu"


# -- checkpoint ---------------------------------------------------------------------------------------


def _checkpoint_keeps_the_new_parameters(rank: int, world: int, tmp: str) -> None:
    from moe_parallel.checkpoints.checkpoint import load_checkpoint, save_checkpoint
    from moe_parallel.integration.engine import build_engine
    from moe_parallel.integration.parallel import initialize_parallel
    from tests.toy_models import DS_CONFIG, VOCAB, E, ToyMoELM, loss_fn

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=E, top_k=2, router_bias=True, expert_bias=True,
                    activation="clamped_swiglu", input_weighted=True, capacity_factor=None, init_std=0.2)  # fmt: skip

    def engine(ep: int):
        state = initialize_parallel(expert_parallel_size=ep, num_experts=E)
        model = ToyMoELM(ep_group=state.ep_group, capacity_factor=None)
        model.moe = MoELayer(cfg, ep_group=state.ep_group)
        return build_engine(model, DS_CONFIG, lr=1e-2, weight_decay=0.0)[0]

    saved = engine(2)
    for step in range(2):
        tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(10 * step + rank))
        saved.backward(loss_fn(saved, tokens))
        saved.step()
    assert torch.count_nonzero(saved.module.moe.router.bias) > 0  # trained away from its zero init
    save_checkpoint(saved, tmp)
    loaded = engine(1)  # another EP layout
    load_checkpoint(loaded, tmp)
    torch.testing.assert_close(loaded.module.moe.router.bias, saved.module.moe.router.bias, rtol=0, atol=0)
    e = E // 2
    for name in ("b1", "b2", "w1"):
        mine = getattr(loaded.module.moe.experts, name)[rank * e : (rank + 1) * e]
        torch.testing.assert_close(mine, getattr(saved.module.moe.experts, name), rtol=0, atol=0, msg=name)


def test_checkpoint_round_trip_keeps_router_and_expert_biases(tmp_path) -> None:
    run_distributed(_checkpoint_keeps_the_new_parameters, 2, str(tmp_path), timeout=240)


def test_expert_biases_and_router_bias_are_not_weight_decayed() -> None:
    from moe_parallel.integration.engine import optimizer_param_groups

    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, expert_bias=True, router_bias=True,
                               activation="clamped_swiglu", shared_expert_ffn_hidden_size=4))  # fmt: skip
    names = {id(p): n for n, p in layer.named_parameters()}
    groups = optimizer_param_groups(layer, weight_decay=0.1)
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {n for n in names.values() if n.endswith(("w1", "w2", "router.weight"))}, decayed
    assert all(g["weight_decay"] in (0.0, 0.1) for g in groups)
