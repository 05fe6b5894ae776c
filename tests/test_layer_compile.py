"""``torch.compile`` of the MoE layer: the whole layer in one graph at EP = 1, matching eager.

At EP = 1 routing, planning, the grouped-GEMM experts and the combine have static shapes and no host
sync, so ``fullgraph=True`` holds for capacity and dropless routing and every router option (random
draws, ``aot_eager``; inductor on two configs). At EP > 1 everything but the dispatcher's collectives
compiles (they are excluded from the graph, as torchtitan keeps dispatch and combine eager).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from moe_parallel import MoEConfig, MoELayer
from tests.dist_utils import run_distributed
from tests.test_layer_counts import random_config


@pytest.fixture(autouse=True)
def capture_scalars():
    import torch._dynamo

    old = torch._dynamo.config.capture_scalar_outputs
    torch._dynamo.config.capture_scalar_outputs = True
    torch._dynamo.reset()
    yield
    torch._dynamo.config.capture_scalar_outputs = old
    torch._dynamo.reset()


def _step(layer, x_TD: torch.Tensor, grad_TD: torch.Tensor, run=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward of ``run`` (default: ``layer``; e.g. its compiled form)."""
    layer.zero_grad()
    x = x_TD.clone().requires_grad_()
    y = (layer if run is None else run)(x)
    y.backward(grad_TD)
    grads = {"x": x.grad, **{n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}}
    return y.detach(), grads


def _assert_compiled_matches_eager(cfg: MoEConfig, tokens: int, backend: str, fullgraph: bool = True) -> None:
    layer = MoELayer(cfg).train()
    gen = torch.Generator().manual_seed(tokens)
    x_TD = torch.randn(tokens, cfg.hidden_size, generator=gen)
    grad_TD = torch.randn(tokens, cfg.hidden_size, generator=gen)
    y_eager, g_eager = _step(layer, x_TD, grad_TD)
    compiled = torch.compile(layer, fullgraph=fullgraph, backend=backend, dynamic=False)
    y, g = _step(layer, x_TD, grad_TD, compiled)
    # float32 GEMMs in another order: a few ulps of the outputs' scale.
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, y_eager, **tol)
    assert g.keys() == g_eager.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_eager[name], **tol, msg=name)


@pytest.mark.parametrize("seed", [*range(4), *(pytest.param(s, marks=pytest.mark.slow) for s in range(4, 12))])
def test_layer_compiles_in_one_graph_and_matches_eager(seed):
    rng = random.Random(2000 + seed)
    kwargs = random_config(rng)
    kwargs["router_noise"] = "none"  # noise draws differ between compiled and eager code
    _assert_compiled_matches_eager(MoEConfig(**kwargs), rng.randint(1, 40), "aot_eager")


@pytest.mark.parametrize("noise", ["jitter", "gumbel"])
def test_layer_with_router_noise_compiles_in_one_graph(noise):
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, router_noise=noise)
    layer = torch.compile(MoELayer(cfg).train(), fullgraph=True, backend="aot_eager")
    y = layer(torch.randn(12, 16, requires_grad=True))
    y.sum().backward()
    assert torch.isfinite(y).all()


CLAMPED_SWIGLU_INPUT_WEIGHTED = dict(
    activation="clamped_swiglu", swiglu_limit=0.5, router_bias=True, input_weighted=True, expert_bias=True
)


@pytest.mark.slow  # inductor generates and builds kernels (~25 s a case); make test keeps the aot_eager draws
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_experts=4, top_k=2, capacity_factor=1.0, activation="swiglu", shared_expert_ffn_hidden_size=8),
        dict(num_experts=8, top_k=1, capacity_factor=None, score_func="sigmoid", expert_bias=True),
        dict(CLAMPED_SWIGLU_INPUT_WEIGHTED, num_experts=4, top_k=2, capacity_factor=1.0),
    ],
    ids=["capacity-swiglu-shared", "dropless-sigmoid-bias", "clamped-swiglu-input-weighted-biases"],
)
def test_layer_compiles_with_inductor(kwargs):
    _assert_compiled_matches_eager(MoEConfig(hidden_size=16, ffn_hidden_size=12, **kwargs), 20, "inductor")


def _compiled_at_ep2_matches_eager(rank: int, world: int) -> None:
    import torch._dynamo

    torch._dynamo.config.capture_scalar_outputs = True
    cases = (
        dict(capacity_factor=1.25, drop_policy="position"),
        dict(capacity_factor=None, shared_expert_ffn_hidden_size=8, z_loss_coeff=1e-3),
    )
    for kwargs in cases:
        cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, **kwargs)
        layer = MoELayer(cfg, ep_group=dist.group.WORLD).train()
        gen = torch.Generator().manual_seed(rank)
        x_TD, grad_TD = torch.randn(10 + rank, 16, generator=gen), torch.randn(10 + rank, 16, generator=gen)
        y_eager, g_eager = _step(layer, x_TD, grad_TD)  # the same module eager first, as in a real run
        torch._dynamo.reset()
        y, g = _step(layer, x_TD, grad_TD, torch.compile(layer, backend="aot_eager", dynamic=False))
        torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
        for name in g_eager:
            torch.testing.assert_close(g[name], g_eager[name], rtol=1e-4, atol=1e-5, msg=name)


def test_layer_compiles_around_the_collectives_at_ep2():
    run_distributed(_compiled_at_ep2_matches_eager, 2, timeout=240)
