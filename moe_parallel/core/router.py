"""Top-k router: a linear gate in float32, its aux losses and its routing statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .comm import ProcessGroup, group_size
from .config import MoEConfig


@dataclass
class RouterOutput:
    expert_TK: Tensor  # int64 expert ids, best choice first
    weight_TK: Tensor  # float32 combine weights (differentiable)
    probs_TE: Tensor  # float32 per-token distribution over experts (for losses and stats)
    logits_TE: Tensor  # float32 gate logits
    tokens_per_expert_E: Tensor  # int64 routed assignments per expert, before any dropping


class TopKRouter(nn.Module):
    """Chooses ``top_k`` experts per token.

    The gate runs in float32 whatever the parameter dtype or autocast, so routing decisions do not
    flip with precision. Noise (jitter on the input, or Gumbel noise on the selection logits) is
    applied in training only; eval routing is deterministic. With ``selection_bias`` (implied by
    ``expert_bias_update_rate > 0``) a per-expert bias is added to the scores for *selection only*
    (DeepSeek-V3's correction bias); :meth:`update_expert_bias` moves it once per optimizer step.

    Logits ``x W^T`` (``+ b`` with ``router_bias``: the parameter ``bias`` [E], trained, float32
    compute like ``weight``). Selection, in order: scores (softmax or sigmoid over all experts) ->
    + selection bias -> keep the ``topk_groups`` best of ``num_groups`` expert groups (a group scores
    the sum of its two best, or its best with ``group_score="max"``) -> top-k. Weights: the selected
    experts' unbiased scores (or a softmax over their logits with ``score_after_topk``), renormalised
    with ``normalize_top_k``, times ``routed_scaling_factor``.
    """

    def __init__(self, config: MoEConfig, seed: int) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.empty(config.num_experts)) if config.router_bias else None
        self.uses_expert_bias = config.selection_bias or config.expert_bias_update_rate > 0
        if self.uses_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        if config.expert_bias_update_rate > 0:
            # Assignment counts since the last bias update; summed over data-parallel ranks there.
            self.register_buffer("_load_since_update", torch.zeros(config.num_experts), persistent=False)
        self._seed = seed
        self.reset_parameters()

    def _apply(self, fn, recurse: bool = True):
        # The selection bias stays float32 when the model is cast (as transformers keeps DeepSeek's
        # e_score_correction_bias): bf16 would swallow its small balancing updates.
        super()._apply(fn, recurse)
        for name in ("expert_bias", "_load_since_update"):
            buf = self._buffers.get(name)
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        gen = torch.Generator().manual_seed(self._seed)
        init = torch.empty(self.weight.shape).normal_(0.0, self.config.init_std, generator=gen)
        self.weight.copy_(init)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x_TD: Tensor) -> RouterOutput:
        cfg = self.config
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            if self.training and cfg.router_noise == "jitter" and cfg.router_jitter_eps > 0:
                eps = cfg.router_jitter_eps
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
            logits_TE = F.linear(x_TD, self.weight.float(), None if self.bias is None else self.bias.float())

            scores_TE = self._score(logits_TE)
            probs_TE = scores_TE
            if cfg.score_func == "sigmoid":
                probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)

            selection_TE = scores_TE.detach()
            if self.training and cfg.router_noise == "gumbel":
                # Gumbel-perturbed selection (DeepSpeed's "RSample"); weights keep the clean scores.
                gumbel_TE = -torch.empty_like(logits_TE).exponential_().log()
                selection_TE = self._score(logits_TE.detach() + gumbel_TE)
            if self.uses_expert_bias:
                selection_TE = selection_TE + self.expert_bias.float()
            if cfg.num_groups > 1:
                selection_TE = limit_to_top_groups(selection_TE, cfg.num_groups, cfg.topk_groups, cfg.group_score)
            expert_TK = top_k_indices(selection_TE, cfg.top_k)

            if cfg.score_after_topk:
                weight_TK = torch.softmax(logits_TE.gather(1, expert_TK), dim=-1)
            else:
                weight_TK = scores_TE.gather(1, expert_TK)
                if cfg.normalize_top_k and cfg.top_k > 1:
                    weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
            if cfg.routed_scaling_factor != 1.0:
                weight_TK = weight_TK * cfg.routed_scaling_factor

        tokens_per_expert_E = count_per_expert(expert_TK, cfg.num_experts)
        if self.training and self.config.expert_bias_update_rate > 0:
            self._load_since_update += tokens_per_expert_E.to(self._load_since_update.dtype)
        return RouterOutput(expert_TK, weight_TK, probs_TE, logits_TE, tokens_per_expert_E)

    def _score(self, logits_TE: Tensor) -> Tensor:
        if self.config.score_func == "softmax":
            return torch.softmax(logits_TE, dim=-1)
        return torch.sigmoid(logits_TE)

    @torch.no_grad()
    def update_expert_bias(self, group: ProcessGroup | None = None) -> None:
        """Aux-loss-free balancing step: ``bias += rate * sign(mean_load - load)``.

        Call once per optimizer step on every rank of ``group`` (the data-parallel group: every rank
        that routes its own tokens), so all replicas apply the same update.
        """
        if self.config.expert_bias_update_rate <= 0:
            return
        load_E = self._load_since_update.clone()
        if group_size(group) > 1:
            torch.distributed.all_reduce(load_E, group=group)
        if load_E.sum() > 0:
            self.expert_bias += self.config.expert_bias_update_rate * torch.sign(load_E.mean() - load_E)
        self._load_since_update.zero_()


def count_per_expert(expert_ids: Tensor, num_experts: int) -> Tensor:
    """int64 number of entries of ``expert_ids`` (all in ``[0, num_experts)``) equal to each expert.

    A scatter-add into ``[num_experts]`` zeros: unlike ``bincount``, whose output length depends on
    the largest id, the shape is static, so the host never waits for the device to learn it.
    """
    ids = expert_ids.reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    return counts_E.scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int64))


def top_k_indices(scores_TE: Tensor, k: int) -> Tensor:
    """Indices of each row's ``k`` largest scores, best first. For k = 1 an argmax (its first maximum
    on a tie), which takes a quarter of ``topk``'s time on CPU."""
    if k == 1:
        return scores_TE.argmax(dim=-1, keepdim=True)
    return torch.topk(scores_TE, k, dim=-1, sorted=True).indices


def limit_to_top_groups(
    selection_TE: Tensor, num_groups: int, topk_groups: int, group_score: str = "top2_sum"
) -> Tensor:
    """``selection_TE`` with every expert outside each token's ``topk_groups`` best groups at -inf.

    Experts ``[g * E/G, (g+1) * E/G)`` form group g. ``group_score="top2_sum"``: a group scores the
    sum of its two best selection scores (its best one when groups hold one expert), as in
    DeepSeek-V3; ``"max"``: its best score, as DeepSeek-V2's ``group_limited_greedy``.
    """
    num_tokens, num_experts = selection_TE.shape
    grouped_TGe = selection_TE.view(num_tokens, num_groups, num_experts // num_groups)
    if group_score == "max":
        group_score_TG = grouped_TGe.amax(dim=-1)
    else:
        best = min(2, grouped_TGe.shape[-1])
        group_score_TG = grouped_TGe.topk(best, dim=-1).values.sum(dim=-1)
    group_TK = group_score_TG.topk(topk_groups, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, group_TK, True)
    return grouped_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)


def load_balancing_loss(probs_TE: Tensor, tokens_per_expert_E: Tensor, top_k: int) -> Tensor:
    """Switch/GShard balance loss ``E * sum_e f_e * P_e``; 1.0 at perfect balance.

    ``f_e`` is the fraction of the T*k assignments routed to e (before dropping) and ``P_e`` the mean
    router probability of e.
    """
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.sum() * 0.0
    fraction_E = tokens_per_expert_E.to(probs_TE.dtype) / (num_tokens * top_k)
    mean_prob_E = probs_TE.mean(dim=0)
    return num_experts * torch.dot(fraction_E, mean_prob_E)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean squared log-partition of the gate logits."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(probs_TE: Tensor) -> Tensor:
    """Mean per-token entropy (nats) of the routing distribution."""
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
