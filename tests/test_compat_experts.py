"""Expert modules for the DeepSpeed drop-in: which forms are recognised, and that each recognised form
computes exactly what the user's module computes (outputs and gradients), over random sizes, row
counts (empty experts included), padding rows past the counts and a range of expert forms."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from moe_parallel.experts.modules import ModuleExperts, StackedExperts, build_module_experts, recognise_expert
from tests.compat_doubles import expert_zoo

ZOO = expert_zoo(8, 12)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_recognition(name: str) -> None:
    expert, activation = ZOO[name]
    form = recognise_expert(expert, 8)
    assert (form is None) == (activation is None), form
    if form is not None:
        assert form.activation == activation
    built = build_module_experts(expert, 8, 3)
    assert isinstance(built, ModuleExperts if activation is None else StackedExperts)
    if name.startswith("pmlp_") and form is not None:
        assert form.kind == "parallel_mlp"
        skip = name.endswith("_skip") and "_bias_" in name
        assert (form.ignored_bias is not None) == skip and (form.b2 is not None) == (name.endswith("_bias_add"))


def test_recognition_does_not_touch_the_global_rng() -> None:
    expert = ZOO["seq_gelu"][0]
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    build_module_experts(expert, 8, 2)
    assert torch.equal(torch.rand(4), expected)


def test_wrong_hidden_size_falls_back_and_fails_at_forward_naming_the_shape() -> None:
    expert = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 6))
    assert recognise_expert(expert, 8) is None
    experts = build_module_experts(expert, 8, 2)
    with pytest.raises(ValueError, match="must map"):
        experts(torch.randn(5, 8), [2, 3])


def _perturbed_copies(experts: ModuleExperts, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in experts.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def _load_stacked_from_copies(stacked: StackedExperts, copies: ModuleExperts) -> None:
    with torch.no_grad():
        for name, module_name in stacked.deepspeed_names().items():
            values = [dict(e.named_parameters())[module_name] for e in copies.deepspeed_experts]
            values = [v.t() if name in ("w1", "w2") else v for v in values]
            getattr(stacked, name).copy_(torch.stack(values))


@pytest.mark.parametrize("seed", range(6))
def test_stacked_forms_equal_the_users_module(seed: int) -> None:
    """Random sizes, row counts and padding: StackedExperts == the module copies, in outputs and grads."""
    rng = random.Random(seed)
    hidden, ffn = rng.choice([4, 8, 16]), rng.choice([6, 8, 24])
    zoo = expert_zoo(hidden, ffn)
    names = [name for name, (_, act) in sorted(zoo.items()) if act is not None]
    num_local = rng.randint(1, 4)
    for name in rng.sample(names, 8):
        expert = copy.deepcopy(zoo[name][0]).double()
        copies = ModuleExperts(expert, num_local)
        _perturbed_copies(copies, seed)
        stacked = build_module_experts(expert, hidden, num_local)
        assert isinstance(stacked, StackedExperts)
        _load_stacked_from_copies(stacked, copies)

        counts = [rng.choice([0, 1, rng.randint(2, 9)]) for _ in range(num_local)]
        padding = rng.choice([0, 0, 3])  # rows past the counts: zero output, zero input gradient
        x = torch.randn(sum(counts) + padding, hidden, dtype=torch.float64)
        as_tensor = rng.random() < 0.5  # the counts as the dispatcher hands them (a device tensor), or a list
        tokens_per_expert = torch.tensor(counts) if as_tensor else counts
        results = []
        for module in (stacked, copies):
            x_ = x.clone().requires_grad_()
            y = module(x_, tokens_per_expert)
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
            results.append((y, x_.grad))
        for what, ours, theirs in zip(("output", "input grad"), *results):
            torch.testing.assert_close(
                ours, theirs, rtol=1e-9, atol=1e-9, msg=lambda m, n=name, w=what: f"{n} {w}: {m}"
            )
        if padding:
            assert torch.count_nonzero(results[0][0][sum(counts) :]) == 0, name
            assert torch.count_nonzero(results[0][1][sum(counts) :]) == 0, name
        for param_name, module_name in stacked.deepspeed_names().items():
            grads = [dict(e.named_parameters())[module_name].grad for e in copies.deepspeed_experts]
            ours = getattr(stacked, param_name).grad
            if param_name == "ignored_bias":  # never reaches the output, as in DeepSpeed
                assert ours is None and all(g is None for g in grads), name
                continue
            expected = torch.stack([g.t() if param_name in ("w1", "w2") else g for g in grads])
            torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-10, msg=f"{name}.{param_name}")


def test_module_experts_run_every_copy_and_give_zero_grads_when_unused() -> None:
    experts = ModuleExperts(ZOO["seq_tanh"][0], 3)
    x = torch.randn(4, 8)
    experts(x, [4, 0, 0]).sum().backward()
    for j in (1, 2):
        for param in experts.deepspeed_experts[j].parameters():
            assert param.grad is not None and not param.grad.any()


@pytest.mark.parametrize("counts", [[3, 3], [2, 2, 1], [6, -1]], ids=["more-than-the-rows", "one-too-many", "negative"])
def test_row_count_mismatch_is_refused(counts: list[int]) -> None:
    """Counts may sum to fewer rows than given (the rest is padding), never to more, and one per expert."""
    for experts in (ModuleExperts(ZOO["seq_tanh"][0], 2), build_module_experts(ZOO["one_linear"][0], 8, 2)):
        with pytest.raises(ValueError, match="tokens_per_expert"):
            experts(torch.randn(5, 8), counts)
