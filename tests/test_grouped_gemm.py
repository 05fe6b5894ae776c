"""The grouped-GEMM expert path (GPU default) computes what the per-expert loop (CPU default) does.

torch's grouped GEMM runs on CPU too, so both paths are compared here on every branch: rows that
arrive grouped and rows gathered by token index, with and without combine weights, D <= F and
D > F, biases, SwiGLU, and an expert without rows. (The grouped GEMM has no float64 kernel, so
these comparisons are in float32.)
"""

from __future__ import annotations

import pytest
import torch

from moe_parallel import GroupedExperts, MoEConfig, MoEConfigError, MoELayer
from moe_parallel.experts import grouped_gemm_supported
from tests.reference import naive_moe


def _pair(ffn: int, bias: bool, activation: str, dtype=torch.float32) -> tuple[GroupedExperts, GroupedExperts]:
    kwargs = dict(hidden_size=8, ffn_hidden_size=ffn, activation=activation, bias=bias, init_std=0.3)
    loop = GroupedExperts(3, expert_gemm="loop", **kwargs).to(dtype)
    grouped = GroupedExperts(3, expert_gemm="grouped", **kwargs).to(dtype)
    grouped.load_state_dict(loop.state_dict())
    if bias:
        with torch.no_grad():
            for b in (loop.b1, loop.b2):
                b.normal_()
        grouped.load_state_dict(loop.state_dict())
    return loop, grouped


def _run(experts: GroupedExperts, x, counts, weight, token_idx, grad):
    x = x.clone().requires_grad_()
    weight = None if weight is None else weight.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = experts(x, counts, weight, token_idx)
    y.backward(grad)
    grads = {name: p.grad for name, p in experts.named_parameters()}
    return y, x.grad, None if weight is None else weight.grad, grads


@pytest.mark.parametrize("ffn", [4, 12], ids=["D>F", "D<=F"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("scaled", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("gathered", [False, True], ids=["grouped-rows", "token-index"])
def test_grouped_gemm_equals_the_loop(ffn, bias, activation, scaled, gathered):
    torch.manual_seed(0)
    loop, grouped = _pair(ffn, bias, activation)
    counts = [4, 0, 3]  # expert 1 gets no rows
    if gathered:
        token_idx = torch.tensor([0, 2, 3, 5, 1, 2, 5])  # a token may go to several experts
        x = torch.randn(6, 8)
    else:
        token_idx = None
        x = torch.randn(7, 8)
    weight = torch.rand(7) if scaled else None
    grad = torch.randn_like(x)
    want = _run(loop, x, counts, weight, token_idx, grad)
    got = _run(grouped, x, counts, weight, token_idx, grad)
    for name, a, b in zip(("y", "grad x", "grad weight"), got[:3], want[:3]):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-4, atol=1e-5, msg=name)
    assert torch.count_nonzero(got[3]["w1"][1]) == 0  # the idle expert's gradient is zero


def test_layer_with_grouped_gemm_matches_the_oracle_and_the_loop():
    torch.manual_seed(3)
    kwargs = dict(hidden_size=8, ffn_hidden_size=12, num_experts=4, top_k=2, min_capacity=0, init_std=0.3)
    loop = MoELayer(MoEConfig(expert_gemm="loop", capacity_factor=1.0, **kwargs))
    grouped = MoELayer(MoEConfig(expert_gemm="grouped", capacity_factor=1.0, **kwargs))
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(24, 8)
    outs = []
    for layer in (loop, grouped):
        x_ = x.clone().requires_grad_()
        y = layer(x_)
        y.square().sum().backward()
        outs.append((y, x_.grad, [p.grad for p in layer.parameters()]))
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1][0], naive_moe(grouped, x)[0], **close)
    torch.testing.assert_close(outs[1][0], outs[0][0], **close)
    torch.testing.assert_close(outs[1][1], outs[0][1], **close)
    for a, b in zip(outs[1][2], outs[0][2]):
        torch.testing.assert_close(a, b, **close)


def test_grouped_gemm_in_bf16_follows_fp32():
    """The GPU configuration (bf16, sizes multiple of 8), here on CPU at a tiny shape."""
    torch.manual_seed(4)
    loop, grouped = _pair(16, False, "gelu", dtype=torch.float32)
    grouped = grouped.to(torch.bfloat16)
    counts, x = [5, 3, 8], torch.randn(16, 8)
    weight = torch.rand(16)
    want = loop(x, counts, weight)
    got = grouped(x.bfloat16(), counts, weight)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_auto_picks_the_loop_off_gpu_and_bad_values_name_the_field():
    experts = GroupedExperts(2, hidden_size=8, ffn_hidden_size=16)
    x = torch.randn(4, 8)
    assert experts.expert_gemm == "auto"
    assert not grouped_gemm_supported(x, (8, 16, 16)) and not experts.uses_grouped_gemm(x)
    assert GroupedExperts(2, 8, 16, expert_gemm="grouped").uses_grouped_gemm(x)
    # bf16 rows of 12 elements (24 bytes) cannot go through torch's kernels: say so, name the option
    odd = GroupedExperts(2, hidden_size=8, ffn_hidden_size=12, expert_gemm="grouped").to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"expert_gemm='grouped' cannot run here.*\[12, 12\].*'loop'"):
        odd(x.bfloat16(), [2, 2])
    with pytest.raises(MoEConfigError, match=r"moe\.expert_gemm='fast'.*auto"):
        MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=2, expert_gemm="fast")


@pytest.mark.parametrize("counts", [[4, 0, 8], [1, 2, 3]], ids=["aligned-groups", "padded-groups"])
def test_grouped_gemm_with_and_without_group_padding(counts):
    """Expert blocks start on 16-byte boundaries: padded when a count is not a multiple of 4 fp32 rows."""
    torch.manual_seed(5)
    loop, grouped = _pair(12, True, "gelu")
    x = torch.randn(sum(counts), 8)
    weight, grad = torch.rand(sum(counts)), torch.randn(sum(counts), 8)
    want = _run(loop, x, counts, weight, None, grad)
    got = _run(grouped, x, counts, weight, None, grad)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-4, atol=1e-5, msg=name)
