"""The grouped-GEMM expert path (GPU default) computes what the per-expert loop (CPU default) does.

torch's grouped GEMM runs on CPU too, so both paths are compared here on grouped rows: D <= F and
D > F, biases, SwiGLU, an expert without rows, padding rows past the counts, counts as a device
tensor or a list, and widths that are no multiple of the kernel's 16-byte row alignment. (The
grouped GEMM has no float64 kernel, so these comparisons are in float32.)
"""

from __future__ import annotations

import pytest
import torch

from moe_parallel import GroupedExperts, MoEConfig, MoEConfigError, MoELayer
from moe_parallel.experts import grouped_gemm_problem, grouped_gemm_supported
from tests.reference import expert_pair, naive_moe, run_experts

CLOSE = dict(rtol=1e-4, atol=1e-5)


def _pair(
    ffn: int, bias: bool, activation: str, dtype=torch.float32, hidden: int = 8
) -> tuple[GroupedExperts, GroupedExperts]:
    return expert_pair(
        3, dtype, hidden_size=hidden, ffn_hidden_size=ffn, activation=activation, bias=bias, init_std=0.3
    )


def _assert_same(got, want) -> None:
    for name in want:
        torch.testing.assert_close(got[name], want[name], **CLOSE, msg=name)


@pytest.mark.parametrize("ffn", [4, 12], ids=["D>F", "D<=F"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("padding", [0, 3], ids=["no-padding", "padding-rows"])
@pytest.mark.parametrize("on_device", [False, True], ids=["list-counts", "tensor-counts"])
def test_grouped_gemm_equals_the_loop(ffn, bias, activation, padding, on_device):
    torch.manual_seed(0)
    loop, grouped = _pair(ffn, bias, activation)
    counts = [4, 0, 3]  # expert 1 gets no rows
    x = torch.randn(sum(counts) + padding, 8)
    grad = torch.randn_like(x)
    tokens_per_expert = torch.tensor(counts) if on_device else counts
    want = run_experts(loop, x, tokens_per_expert, grad)
    got = run_experts(grouped, x, tokens_per_expert, grad)
    _assert_same(got, want)
    assert torch.count_nonzero(got["grad w1"][1]) == 0  # the idle expert's gradient is zero
    if padding:  # padding rows: zero output and zero input gradient, whatever they hold
        assert torch.count_nonzero(got["y"][sum(counts) :]) == 0
        assert torch.count_nonzero(got["grad x"][sum(counts) :]) == 0


def test_layer_with_grouped_gemm_matches_the_oracle_and_the_loop():
    """Dropping at EP = 1: the grouped path takes the dropped assignments as padding rows."""
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
    assert grouped.last_stats.dropped_fraction > 0
    torch.testing.assert_close(outs[1][0], naive_moe(grouped, x)[0], **CLOSE)
    torch.testing.assert_close(outs[1][0], outs[0][0], **CLOSE)
    torch.testing.assert_close(outs[1][1], outs[0][1], **CLOSE)
    for a, b in zip(outs[1][2], outs[0][2]):
        torch.testing.assert_close(a, b, **CLOSE)


@pytest.mark.parametrize("capacity_factor", [1.0, None], ids=["dropping", "dropless"])
def test_grouped_path_at_ep1_reads_no_counts_on_the_host(capacity_factor):
    """The grouped GEMM keeps its counts on the device: the dispatcher hands it every assignment, the
    dropped ones past the kept counts, and reads nothing back."""
    torch.manual_seed(5)
    cfg = MoEConfig(
        hidden_size=8,
        ffn_hidden_size=16,
        num_experts=4,
        top_k=2,
        capacity_factor=capacity_factor,
        expert_gemm="grouped",
    )
    layer = MoELayer(cfg).train()
    x_TD = torch.randn(20, 8)
    assert not layer.experts.needs_host_counts(x_TD)
    _, _, plan = layer.route_and_plan(x_TD)
    d = layer.dispatcher.dispatch(x_TD, plan, host_counts=layer.experts.needs_host_counts(x_TD))
    x_local = layer.dispatcher.wait(d)
    assert d.counts_host is None and x_local.shape[0] == 20 * 2
    assert (int(plan.num_kept) < 20 * 2) == (capacity_factor is not None)  # dropping leaves padding rows
    y = layer.dispatcher.combine(layer.experts(x_local, d.tokens_per_local_expert, d.counts_host), d.state)
    torch.testing.assert_close(y, naive_moe(layer, x_TD)[0], **CLOSE)


def test_grouped_gemm_in_bf16_follows_fp32():
    """The GPU configuration (bf16, sizes multiple of 8), here on CPU at a tiny shape."""
    torch.manual_seed(4)
    loop, grouped = _pair(16, False, "gelu", dtype=torch.float32)
    grouped = grouped.to(torch.bfloat16)
    counts, x = [5, 3, 8], torch.randn(16, 8)
    want = loop(x, counts)
    got = grouped(x.bfloat16(), torch.tensor(counts))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_auto_picks_a_cpu_path_off_gpu_and_bad_values_name_the_field():
    experts = GroupedExperts(2, hidden_size=8, ffn_hidden_size=16)
    x = torch.randn(4, 8)
    assert experts.expert_gemm == "auto"
    assert not grouped_gemm_supported(x, (8, 16, 16)) and not experts.uses_grouped_gemm(x)
    assert experts.execution_path(x) in ("loop", "padded")
    assert GroupedExperts(2, 8, 16, expert_gemm="grouped").uses_grouped_gemm(x)
    with pytest.raises(ValueError, match=r"expert_gemm='grouped' cannot run here.*float64.*'loop'"):
        GroupedExperts(2, 8, 16, expert_gemm="grouped").double()(x.double(), [2, 2])
    with pytest.raises(MoEConfigError, match=r"moe\.expert_gemm='fast'.*auto"):
        MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=2, expert_gemm="fast")


@pytest.mark.parametrize(
    "hidden, ffn, dtype",
    [(8, 12, torch.bfloat16), (6, 5, torch.float32), (5, 7, torch.bfloat16)],
    ids=["bf16-F12", "fp32-D6-F5", "bf16-D5-F7"],
)
def test_widths_off_the_row_alignment_run_and_equal_the_loop(hidden, ffn, dtype):
    """Rows of torch's kernel must be multiples of 16 bytes: the grouped path pads misaligned widths
    with zero columns, so any width runs (no refusal) and gives the loop's result."""
    torch.manual_seed(6)
    loop, grouped = _pair(ffn, True, "swiglu", hidden=hidden)
    grouped = grouped.to(dtype)
    counts = [3, 0, 5]
    x = torch.randn(sum(counts) + 1, hidden)
    assert grouped_gemm_problem(x.to(dtype), (hidden, 2 * ffn, ffn)) is None
    grad = torch.randn_like(x)
    want = run_experts(loop, x, counts, grad)
    got = run_experts(grouped, x.to(dtype), counts, grad.to(dtype))
    tol = CLOSE if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name], **tol, msg=name)


@pytest.mark.parametrize("counts", [[4, 0, 8], [1, 2, 3]], ids=["aligned-groups", "padded-groups"])
def test_grouped_gemm_with_and_without_group_padding(counts):
    """Expert blocks start on 16-byte boundaries: padded when a count is not a multiple of 4 fp32 rows."""
    torch.manual_seed(5)
    loop, grouped = _pair(12, True, "gelu")
    x, grad = torch.randn(sum(counts), 8), torch.randn(sum(counts), 8)
    _assert_same(run_experts(grouped, x, counts, grad), run_experts(loop, x, counts, grad))


def test_the_grouped_path_traces_as_one_graph():
    """No host sync and static shapes: ``torch.compile(fullgraph=True)`` traces the experts whole and
    computes the eager result."""
    torch.manual_seed(7)
    _, grouped = _pair(12, True, "swiglu")
    x, counts = torch.randn(10, 8), torch.tensor([4, 0, 5])  # one padding row
    compiled = torch.compile(grouped, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, counts), grouped(x, counts), **CLOSE)
