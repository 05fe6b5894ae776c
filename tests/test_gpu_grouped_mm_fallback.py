"""Which grouped GEMM the experts call: ``F.grouped_mm``, else torch 2.8-2.11's ``torch._grouped_mm``,
else none (``auto`` falls back to the per-expert loop; ``grouped`` names the cause). torch's
attributes are monkeypatched away to play the older releases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_parallel import GroupedExperts
from moe_parallel.experts import grouped_gemm_problem, grouped_mm_op


def _experts(expert_gemm: str) -> GroupedExperts:
    return GroupedExperts(3, hidden_size=8, ffn_hidden_size=16, expert_gemm=expert_gemm, init_std=0.3)


def test_the_public_grouped_mm_comes_first():
    if not hasattr(F, "grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.grouped_mm")
    assert grouped_mm_op() is F.grouped_mm


def test_private_grouped_mm_runs_the_experts_where_the_public_one_is_missing(monkeypatch):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm")
    real, calls = torch._grouped_mm, []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.delattr(F, "grouped_mm", raising=False)
    monkeypatch.setattr(torch, "_grouped_mm", counting)
    assert grouped_mm_op() is counting
    torch.manual_seed(0)
    loop, grouped = _experts("loop"), _experts("grouped")
    grouped.load_state_dict(loop.state_dict())
    x, counts = torch.randn(9, 8), torch.tensor([4, 0, 5])
    y = grouped(x, counts)
    assert len(calls) == 2  # both products went through torch._grouped_mm
    torch.testing.assert_close(y, loop(x, counts), rtol=1e-4, atol=1e-5)


def test_without_a_grouped_gemm_auto_uses_the_loop_and_grouped_names_the_cause(monkeypatch):
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert grouped_mm_op() is None
    x = torch.randn(6, 8)
    problem = grouped_gemm_problem(x, (8, 16, 16))
    assert "neither torch.nn.functional.grouped_mm nor torch._grouped_mm" in problem
    auto = _experts("auto")
    assert not auto.uses_grouped_gemm(x)
    assert auto(x, [2, 2, 2]).shape == x.shape
    with pytest.raises(
        ValueError, match=r"expert_gemm='grouped' cannot run here: torch's grouped GEMM is missing.*'loop'"
    ):
        _experts("grouped")(x, [2, 2, 2])
