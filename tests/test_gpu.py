"""CUDA correctness: the paths that no CPU run exercises (``pytest -m gpu``; skipped without CUDA).

``make gpu-check`` runs these first on a lent GPU; its dry run (no CUDA) runs them on the CPU with
``MOE_GPU_TESTS_DEVICE=cpu``, so that the tests themselves cannot rot (CUDA-only expectations, such as
``auto`` picking the grouped GEMM, are then checked the CPU's way). Every result is compared with an fp64 oracle
computed on the CPU from the same (rounded) inputs and weights, with a tolerance relative to the
result's scale that follows the dtype: 2e-5 for fp32 (its errors are ~1e-6), 3e-2 for bf16 (8
mantissa bits, bf16 intermediates: errors of a few 1e-3); a wrong expert, row or scale is off by O(1).
"""

from __future__ import annotations

import copy
import os
import zlib

import pytest
import torch
from torch import Tensor, nn

from moe_parallel import GroupedExperts, MoEConfig, MoELayer
from moe_parallel.experts import grouped_mm_op
from moe_parallel.experts import stacked as stacked_module
from tests.reference import activation as reference_activation
from tests.reference import expert_pair, naive_moe, run_experts

DEVICE = torch.device(os.environ.get("MOE_GPU_TESTS_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
# Largest error allowed, as a fraction of the largest magnitude of the oracle's result.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def assert_close_scaled(got: Tensor, want: Tensor, dtype: torch.dtype, name: str) -> None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = want.abs().max().clamp_min(1e-12)
    err = (got - want).abs().max()
    assert err <= TOLERANCE[dtype] * scale, f"{name}: max error {err:.3g} > {TOLERANCE[dtype]} x scale {scale:.3g}"


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """fp32 means fp32 here: no TF32 in the products the fp32 tolerances are set for."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------- experts: grouped GEMM


def _random_counts(num_experts: int, gen: torch.Generator) -> list[int]:
    """Rows per expert: idle experts, single rows and counts that are no multiple of the 16-byte row
    alignment, so the grouped path's group alignment is exercised."""
    counts = torch.randint(2, 40, (num_experts,), generator=gen)
    perm = torch.randperm(num_experts, generator=gen)
    counts[perm[:2]] = 0
    counts[perm[2]] = 1
    return counts.tolist()


def _oracle_experts(x, counts, w1, w2, activation):
    """fp64 CPU: y[i] = act(x[i] @ W1[j]) @ W2[j] for every row i of expert j; rows past the counts zero."""
    y = torch.zeros_like(x)
    start = 0
    for j, n in enumerate(counts):
        rows = slice(start, start + n)
        y[rows] = reference_activation(x[rows] @ w1[j], activation) @ w2[j]
        start += n
    return y


def _check_against_the_oracle(num_experts, hidden, ffn, activation, padding, dtype, gen, monkeypatch):
    """Both expert paths on DEVICE, forward and backward, against the fp64 oracle and each other.
    Rows past the counts are padding (dropped assignments at EP = 1): zero output and gradient."""
    counts = _random_counts(num_experts, gen)
    num_rows = sum(counts) + padding
    x = torch.randn(num_rows, hidden, generator=gen)
    grad = torch.randn(num_rows, hidden, generator=gen)
    kwargs = dict(hidden_size=hidden, ffn_hidden_size=ffn, activation=activation, init_std=0.1)
    loop, grouped = expert_pair(num_experts, dtype, DEVICE, **kwargs)

    # The oracle, in fp64 from the same rounded inputs and weights.
    leaves = [t.detach().cpu().to(dtype).double().requires_grad_() for t in (x, loop.w1, loop.w2)]
    y_want = _oracle_experts(leaves[0], counts, leaves[1], leaves[2], activation)
    y_want.backward(grad.to(dtype).double())
    want = {"y": y_want, "grad x": leaves[0].grad, "grad w1": leaves[1].grad, "grad w2": leaves[2].grad}

    # The counts as the dispatcher hands them: an int64 tensor on the device.
    args = (x.to(DEVICE, dtype), torch.tensor(counts, device=DEVICE), grad.to(DEVICE, dtype))
    got_loop = run_experts(loop, *args)
    for name in want:
        assert_close_scaled(got_loop[name], want[name], dtype, f"loop {name}")
    assert not loop.uses_grouped_gemm(args[0])

    if dtype != torch.bfloat16 and ON_CUDA:  # our selection refuses non-bf16 on CUDA; ask torch's kernel
        monkeypatch.setattr(stacked_module, "grouped_gemm_problem", lambda x, sizes: None)
    try:
        got_grouped = run_experts(grouped, *args)
    except RuntimeError as err:  # a fact for the results file, once the loop has been checked
        pytest.skip(f"torch {torch.__version__}'s grouped GEMM on {DEVICE} refuses {dtype}: {str(err)[:200]}")
    for name in want:
        assert_close_scaled(got_grouped[name], want[name], dtype, f"grouped {name}")
        assert_close_scaled(got_grouped[name], got_loop[name], dtype, f"grouped vs loop {name}")
    assert torch.count_nonzero(got_grouped["grad w1"][counts.index(0)]) == 0  # an idle expert's gradient
    if padding:
        assert torch.count_nonzero(got_grouped["y"][sum(counts) :]) == 0
        assert torch.count_nonzero(got_grouped["grad x"][sum(counts) :]) == 0


@DTYPES
@pytest.mark.parametrize("ffn", [128, 32], ids=["D<=F", "D>F"])
@pytest.mark.parametrize("padding", [0, 5], ids=["no-padding", "padding-rows"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_gemm_matches_the_loop_and_the_oracle(dtype, ffn, padding, activation, monkeypatch):
    """Forward and backward of both expert paths on CUDA against the fp64 oracle and each other."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{ffn}{padding}{activation}".encode()))
    _check_against_the_oracle(8, 64, ffn, activation, padding, dtype, gen, monkeypatch)


@pytest.mark.parametrize("hidden, ffn", [(64, 12), (36, 20)], ids=["F12", "D36-F20"])
def test_widths_off_the_row_alignment_run_through_the_grouped_gemm(hidden, ffn, monkeypatch):
    """bf16 widths that are no multiple of 8 elements (16 bytes): the grouped path pads them with
    zero columns instead of refusing, and computes the oracle's result."""
    gen = torch.Generator().manual_seed(hidden * 1000 + ffn)
    _check_against_the_oracle(6, hidden, ffn, "swiglu", 3, torch.bfloat16, gen, monkeypatch)


def test_torch_offers_a_grouped_gemm_and_auto_picks_it_in_bf16():
    """``auto`` resolves once per experts module, from the first activations it sees."""
    assert grouped_mm_op() is not None, f"torch {torch.__version__}: no grouped GEMM, the loop runs instead"
    fp32 = GroupedExperts(4, hidden_size=64, ffn_hidden_size=128).to(DEVICE)
    assert not fp32.uses_grouped_gemm(torch.zeros(2, 64, device=DEVICE))  # fp32: a per-expert path
    bf16 = GroupedExperts(4, hidden_size=64, ffn_hidden_size=128).to(DEVICE, torch.bfloat16)
    assert bf16.uses_grouped_gemm(torch.zeros(2, 64, device=DEVICE, dtype=torch.bfloat16)) == ON_CUDA
    x_bf16 = torch.zeros(2, 64, device=DEVICE, dtype=torch.bfloat16)
    assert bf16.resolve_path(x_bf16, 1) in (("grouped",) if ON_CUDA else ("loop", "padded"))


def test_a_grouped_request_that_cannot_run_names_the_fix():
    # CUDA's kernels take bf16 only; the CPU's take fp32, bf16 and fp16, not fp64.
    refused = torch.float32 if ON_CUDA else torch.float64
    experts = GroupedExperts(2, hidden_size=64, ffn_hidden_size=128, expert_gemm="grouped").to(DEVICE, refused)
    with pytest.raises(ValueError, match=rf"expert_gemm='grouped' cannot run here.*{refused}.*'loop'"):
        experts(torch.randn(4, 64, device=DEVICE, dtype=refused), torch.tensor([2, 2], device=DEVICE))
    config = MoEConfig(hidden_size=64, ffn_hidden_size=128, num_experts=4, expert_gemm="grouped")
    with pytest.raises(ValueError, match=r"moe\.expert_gemm='grouped' cannot run here"):
        MoELayer(config).to(DEVICE, refused)(torch.randn(8, 64, device=DEVICE, dtype=refused))


# --------------------------------------------------------------------------- router and layer


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32-params", "bf16-params"])
def test_router_computes_in_fp32_under_bf16_autocast(param_dtype):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=64, ffn_hidden_size=128, num_experts=16, top_k=4, init_std=0.1))
    layer = layer.to(DEVICE, param_dtype).train()
    x = torch.randn(512, 64, device=DEVICE, dtype=param_dtype, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        route = layer.router(x)
        y = layer(x)
    for name in ("logits_TE", "probs_TE", "weight_TK"):
        assert getattr(route, name).dtype == torch.float32, name
    want = x.detach().double() @ layer.router.weight.detach().double().t()
    err = (route.logits_TE.double() - want).abs().max()
    assert err <= 1e-5 * want.abs().max(), f"logits off by {err:.3g}: not computed in fp32"  # bf16: ~4e-3
    # The selected experts are the top-k of the exact logits wherever the k-th and (k+1)-th differ clearly.
    top = want.topk(5, dim=-1)
    clear = (top.values[:, 3] - top.values[:, 4]) > 1e-4 * want.abs().max()
    got_sets = route.expert_TK.sort(-1).values
    assert torch.equal(got_sets[clear].cpu(), top.indices[:, :4].sort(-1).values[clear].cpu())
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.router.weight.grad).all()


@DTYPES
@pytest.mark.parametrize("capacity_factor", [1.0, None], ids=["dropping", "dropless"])
def test_moe_layer_on_cuda_matches_the_oracle(dtype, capacity_factor):
    torch.manual_seed(1)
    config = MoEConfig(
        hidden_size=64,
        ffn_hidden_size=128,
        num_experts=8,
        top_k=2,
        capacity_factor=capacity_factor,
        min_capacity=0,
        drop_policy="position",
        z_loss_coeff=1e-3,
        init_std=0.1,
    )
    layer = MoELayer(config).to(DEVICE, dtype).train()
    oracle = copy.deepcopy(layer).to("cpu", torch.float64)
    x = torch.randn(4, 96, 64).to(dtype)
    grad = torch.randn(4, 96, 64).to(dtype)
    x_cuda = x.to(DEVICE, copy=True).requires_grad_()
    y = layer(x_cuda)
    y.backward(grad.to(DEVICE))
    assert (layer.experts.resolved_gemm == "grouped") == (dtype == torch.bfloat16 and ON_CUDA)

    x64 = x.double().requires_grad_()
    y_want, aux = naive_moe(oracle, x64)
    ((y_want * grad.double()).sum() + aux).backward()
    assert_close_scaled(y, y_want, dtype, "y")
    assert_close_scaled(x_cuda.grad, x64.grad, dtype, "grad x")
    for (name, p), p_want in zip(layer.named_parameters(), oracle.parameters()):
        assert_close_scaled(p.grad, p_want.grad, dtype, f"grad {name}")


# --------------------------------------------------------------------------- DeepSpeed's layer


@DTYPES
@pytest.mark.parametrize("k", [1, 2])
def test_compat_layer_matches_deepspeeds_layer_on_cuda(dtype, k):
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    from moe_parallel.integration.compat import MoE

    hidden, ffn, num_experts = 64, 128, 8
    expert = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
    kwargs = dict(
        num_experts=num_experts,
        k=k,
        capacity_factor=float(num_experts),  # nothing dropped: DeepSpeed's RTS would drop at random
        eval_capacity_factor=float(num_experts),
        top2_2nd_expert_sampling=False,
    )
    torch.manual_seed(1)
    theirs = DeepSpeedMoE(hidden, copy.deepcopy(expert), **kwargs)
    torch.manual_seed(1)
    ours = MoE(hidden, copy.deepcopy(expert), **kwargs)
    gen = torch.Generator().manual_seed(2)
    weights = {key: v + 0.1 * torch.randn(v.shape, generator=gen) for key, v in theirs.state_dict().items()}
    theirs.load_state_dict(weights)
    ours.load_state_dict(weights)
    theirs, ours = theirs.to(DEVICE, dtype).train(), ours.to(DEVICE, dtype).train()
    x = torch.randn(4, 64, hidden, generator=gen).to(DEVICE, dtype)
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_theirs, _, counts_theirs = theirs(x_theirs)
    out_ours, _, counts_ours = ours(x_ours)
    assert out_ours.dtype == out_theirs.dtype == dtype
    assert torch.equal(counts_ours.cpu(), counts_theirs.cpu())
    assert_close_scaled(out_ours, out_theirs, dtype, "output")
    out_ours.float().square().sum().backward()
    out_theirs.float().square().sum().backward()
    assert_close_scaled(x_ours.grad, x_theirs.grad, dtype, "grad x")
    fc1_theirs = torch.stack([e[0].weight.grad.t() for e in theirs.deepspeed_moe.experts.deepspeed_experts])
    assert_close_scaled(ours.experts.w1.grad, fc1_theirs, dtype, "grad fc1")


@DTYPES
@pytest.mark.parametrize("k", [1, 2])
def test_moe_layer_matches_deepspeeds_layer_on_cuda(dtype, k):
    """Our MoELayer with DeepSpeed's gate and experts' weights: the same output and input gradient
    (capacity large enough that neither drops; aux losses off, their definitions differ at k=2)."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    hidden, ffn, num_experts = 64, 128, 8
    config = MoEConfig(
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_experts=num_experts,
        top_k=k,
        capacity_factor=float(num_experts),
        aux_loss_coeff=0.0,
        init_std=0.1,
    )
    torch.manual_seed(3)
    ours = MoELayer(config)
    expert = nn.Sequential(nn.Linear(hidden, ffn, bias=False), nn.GELU(), nn.Linear(ffn, hidden, bias=False))
    theirs = DeepSpeedMoE(
        hidden,
        expert,
        num_experts=num_experts,
        k=k,
        capacity_factor=float(num_experts),
        eval_capacity_factor=float(num_experts),
        top2_2nd_expert_sampling=False,
    )
    with torch.no_grad():
        theirs.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for j, local in enumerate(theirs.deepspeed_moe.experts.deepspeed_experts):
            local[0].weight.copy_(ours.experts.w1[j].t())
            local[2].weight.copy_(ours.experts.w2[j].t())
    ours, theirs = ours.to(DEVICE, dtype).train(), theirs.to(DEVICE, dtype).train()
    x = torch.randn(512, hidden).to(DEVICE, dtype)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours = ours(x_ours)
    y_theirs, _, counts_theirs = theirs(x_theirs)
    assert torch.equal(ours.last_stats.tokens_per_expert.cpu().long(), counts_theirs.cpu().long())
    assert_close_scaled(y_ours, y_theirs, dtype, "output")
    y_ours.float().square().sum().backward()
    y_theirs.float().square().sum().backward()
    assert_close_scaled(x_ours.grad, x_theirs.grad, dtype, "grad x")


# --------------------------------------------------------------------------- norms (apex or torch)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_model_norms_on_cuda(kind):
    """Apex's fused norm where its CUDA extension is importable, else torch's: the same values."""
    from moe_parallel.models.gpt import make_norm

    norm = make_norm(kind, 64).to(DEVICE)
    x = torch.randn(8, 64, device=DEVICE)
    x64 = x.double()
    if kind == "rmsnorm":
        want = x64 / x64.square().mean(-1, keepdim=True).add(1e-5).sqrt()
    else:
        want = (x64 - x64.mean(-1, keepdim=True)) / x64.var(-1, unbiased=False, keepdim=True).add(1e-5).sqrt()
    print(f"{kind}: {type(norm).__module__}.{type(norm).__name__}")
    assert_close_scaled(norm(x), want, torch.float32, kind)
