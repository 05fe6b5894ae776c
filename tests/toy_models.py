"""The toy MoE language model the engine, checkpoint and fault tests train: embedding -> MoE layer
(residual) -> head, over a 32-token vocabulary, with its loss, its batches and a DeepSpeed config."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_parallel import MoEConfig, MoELayer

VOCAB, D, E = 32, 16, 4
# One micro-batch of 2 sequences per rank; the tests add the ZeRO stage and precision.
DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9}


class ToyMoELM(nn.Module):
    """Seeded (``torch.manual_seed(0)``), so every rank and every reference builds the same weights.

    ``moe_overrides`` replace fields of the layer's ``MoEConfig`` (e.g. ``expert_bias_update_rate``).
    """

    def __init__(self, ep_group: Any = None, capacity_factor: float | None = 1.0, **moe_overrides: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        fields: dict[str, Any] = dict(
            hidden_size=D,
            ffn_hidden_size=24,
            num_experts=E,
            top_k=2,
            capacity_factor=capacity_factor,
            min_capacity=1,
            aux_loss_coeff=0.1,
            z_loss_coeff=0.01,
            init_std=0.2,
        )
        self.moe = MoELayer(MoEConfig(**{**fields, **moe_overrides}), ep_group=ep_group)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(h + self.moe(h))


def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over ``tokens`` [B, S]."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def toy_batch(step: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s micro-batch of step ``step``: 2 sequences of 9 tokens, the same on every run."""
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1000 * step + rank))
