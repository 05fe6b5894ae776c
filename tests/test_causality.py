"""Is token dropping causal? Can a later token change whether an earlier token's assignment is kept?

In a causal LM, an earlier position must not depend on a later token. Under a capacity limit it can,
through the drop decision: the tokens compete for the same expert slots.
- ``position`` with top_k=1: causal. Queues are in token order, so a later token only ever queues
  behind the earlier ones.
- ``position`` with top_k>=2: not causal. All first choices go before all second choices (GShard),
  so a later token's first choice can take the slot of an earlier token's second choice.
- ``probs``: not causal. The highest weight goes first, wherever its token is.
Checked on the plan itself (exact: which assignments are kept) over random draws, and on a GPT.
"""

from __future__ import annotations

import pytest
import torch

from moe_parallel import plan_dispatch
from moe_parallel.models import GPT, GPTConfig
from tests.tolerance import float_tolerance


def _kept(expert_TK, weight_TK, num_experts, capacity, policy) -> set[tuple[int, int]]:
    """The kept (token, choice) pairs."""
    counts_E = torch.bincount(expert_TK.reshape(-1), minlength=num_experts)
    plan = plan_dispatch(expert_TK, weight_TK, counts_E, capacity, policy)
    num_tokens = expert_TK.shape[0]
    kept = set()
    # Recover (token, choice) from (token, expert): a token picks distinct experts.
    order_E = {(int(t), int(e)) for t, e in zip(plan.token_idx_A[: int(plan.num_kept)], _experts_of(plan), strict=True)}
    for t in range(num_tokens):
        for k in range(expert_TK.shape[1]):
            if (t, int(expert_TK[t, k])) in order_E:
                kept.add((t, k))
    return kept


def _experts_of(plan) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(plan.tokens_per_expert_E.numel()), plan.tokens_per_expert_E)


def _draw(gen: torch.Generator, num_tokens: int, num_experts: int, top_k: int):
    scores_TE = torch.rand(num_tokens, num_experts, generator=gen)
    weight_TK, expert_TK = scores_TE.topk(top_k, dim=-1)
    return expert_TK, weight_TK


def _earlier_changed(policy: str, top_k: int, seed: int) -> bool:
    """Re-route one token at random; does the kept set of any earlier token change?"""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = int(torch.randint(4, 40, (), generator=gen))
    num_experts = int(torch.randint(top_k + 1, 9, (), generator=gen))
    capacity = int(torch.randint(1, max(2, num_tokens * top_k // num_experts), (), generator=gen))
    expert_TK, weight_TK = _draw(gen, num_tokens, num_experts, top_k)
    t = int(torch.randint(1, num_tokens, (), generator=gen))
    expert2_TK, weight2_TK = expert_TK.clone(), weight_TK.clone()
    new_e, new_w = _draw(gen, 1, num_experts, top_k)
    expert2_TK[t], weight2_TK[t] = new_e[0], new_w[0]
    before = {a for a in _kept(expert_TK, weight_TK, num_experts, capacity, policy) if a[0] < t}
    after = {a for a in _kept(expert2_TK, weight2_TK, num_experts, capacity, policy) if a[0] < t}
    return before != after


def test_position_policy_with_top1_is_causal_under_drops():
    assert not any(_earlier_changed("position", 1, seed) for seed in range(300))


@pytest.mark.parametrize("policy,top_k", [("position", 2), ("probs", 1), ("probs", 2)])
def test_other_policies_are_not_causal(policy, top_k):
    assert any(_earlier_changed(policy, top_k, seed) for seed in range(300))


def _gpt(policy: str, top_k: int) -> GPT:
    moe = {"num_experts": 4, "top_k": top_k, "capacity_factor": 0.5, "min_capacity": 0, "drop_policy": policy}
    cfg = GPTConfig(vocab_size=32, seq_len=24, num_layers=2, hidden_size=16, num_heads=2, ffn_hidden_size=24,
                    moe_every=1, moe=moe, init_std=0.1)  # fmt: skip
    return GPT(cfg).train()  # training: the capacity factor applies, tokens are dropped


@pytest.mark.parametrize("seed", range(4))
def test_gpt_with_position_top1_is_causal_in_training(seed):
    """One sequence (tokens of other rows are earlier in the flattened batch, which is harmless)."""
    model = _gpt("position", 1)
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 32, (1, 24), generator=gen)
    pos = int(torch.randint(1, 24, (), generator=gen))
    t2 = t.clone()
    t2[0, pos] = (t2[0, pos] + 1) % 32
    a, b = model(t), model(t2)
    assert model.blocks[0].ffn.last_stats.dropped_fraction > 0  # the capacity limit is hit
    torch.testing.assert_close(a[:, :pos], b[:, :pos], **float_tolerance(torch.float32, 24, depth=3))
