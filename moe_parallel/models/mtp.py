"""DeepSeek-V3 multi-token prediction (MTP): modules after the last block, each predicting one token
further ahead, trained beside the LM loss (DeepSeek-V3 technical report, section 2.2).

MTP module ``k`` (depth ``k = 1 .. N``, ``N = mtp_layers``) at position ``i``, with ``h_0`` the main
model's hidden state after the final norm (what the LM head reads)::

    h_k[i]      = head_norm_k(Block_k(eh_proj_k(cat(enorm_k(Emb(t[i + k])), hnorm_k(h_{k-1}[i])))))
    logits_k[i] = Head(h_k[i])                       (the main model's embedding and output head)
    L_k         = mean cross entropy of logits_k[i] against t[i + k + 1], where that token exists
    L           = L_main + mtp_loss_weight / N * sum_k L_k

The embedding comes first in the concatenation and ``h_0`` is taken after the final norm, as the
readers of the released DeepSeek-V3 weights take them (vLLM's and SGLang's ``deepseek_mtp``,
Megatron-Core's ``multi_token_prediction.py``, whose decoder output is final-normed); ``h_k`` passed
on to depth ``k + 1`` is likewise the normed state its head reads. ``Block_k`` is a full
:class:`DecoderBlock` numbered ``num_layers + k - 1``, so its parameters' seeds, its MoE layer number
(which names its experts in checkpoints and metrics) and its Hugging Face keys
(``model.layers.{num_layers + k - 1}.*``) follow on from the main blocks.

Training inputs are ``tokens[i] = t[i]`` and ``targets[i] = t[i + 1]``, so depth ``k`` reads
``Emb(t[i + k]) = Emb(targets[i + k - 1])`` and predicts ``targets[i + k]``: everything it needs is in
the targets and ``h_0``, which is why the MTP modules run on the last pipeline stage, inside the loss
function. Depth ``k`` runs on the first ``S - k`` positions only (the ones with a target); its block
is causal, so they see what they would see in the whole sequence (with dropless MoE routing; a
capacity limit drops among fewer tokens). A target of -100 is ignored, and
so is a position whose input token at that depth is -100.

Parameter names (plain :class:`Decoder`; ``j = num_layers + k - 1``): ``mtp.{j}.enorm.weight``,
``mtp.{j}.hnorm.weight``, ``mtp.{j}.eh_proj.weight`` ``[D, 2D]``, ``mtp.{j}.block.*`` (as
``blocks.{i}.*``) and ``mtp.{j}.head_norm.weight`` (the checkpoint's ``shared_head.norm``).

Shape suffixes: B batch, S sequence, P positions a depth predicts (S - k), D hidden, V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.comm import ProcessGroup
from .attention import RMSNorm
from .decoder import DecoderBlock
from .gpt import TokenEmbedding, _normal_, lm_loss

if TYPE_CHECKING:
    from .decoder import DecoderConfig

IGNORE_INDEX = -100  # lm_loss's ignored target


class MTPModule(nn.Module):
    """MTP module of depth ``depth`` (1-based): ``(h_{k-1}, Emb(t[i + k])) -> h_k``."""

    def __init__(self, config: DecoderConfig, depth: int, ep_group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.depth = depth
        self.layer_number = config.num_layers + depth - 1
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.norm_eps)
        self.hnorm = RMSNorm(D, config.norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = DecoderBlock(config, self.layer_number, ep_group)
        self.head_norm = RMSNorm(D, config.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg = self.config
        _normal_(self.eh_proj.weight, cfg.init_std, cfg.init_seed, f"mtp.{self.layer_number}.eh_proj.weight")
        for norm in (self.enorm, self.hnorm, self.head_norm):
            nn.init.ones_(norm.weight)

    def forward(self, h_BPD: Tensor, emb_BPD: Tensor) -> Tensor:
        x_BPD = self.eh_proj(torch.cat((self.enorm(emb_BPD), self.hnorm(h_BPD)), dim=-1))
        return self.head_norm(self.block(x_BPD))


class MTPStack(nn.Module):
    """The MTP modules, named by their block's global index (``"{num_layers + k - 1}"``).

    As a layer (after the final norm) its forward passes ``x_BSD`` through unchanged and, in
    training, keeps it as ``h_0``: the loss (:meth:`weighted_loss`) reads it together with the
    targets, which in a DeepSpeed pipeline only the loss function receives.
    """

    def __init__(self, config: DecoderConfig, ep_group: ProcessGroup | None = None) -> None:
        super().__init__()
        if config.mtp_layers < 1:
            raise ValueError(f"MTPStack needs model.mtp_layers >= 1, got {config.mtp_layers}")
        self.config = config
        for depth in range(1, config.mtp_layers + 1):
            module = MTPModule(config, depth, ep_group)
            self.add_module(str(module.layer_number), module)
        self._h0_BSD: Tensor | None = None

    @property
    def depths(self) -> list[MTPModule]:
        """The modules in depth order (depth 1 first)."""
        return list(self.children())

    def forward(self, x_BSD: Tensor) -> Tensor:
        self._h0_BSD = x_BSD if self.training else None
        return x_BSD

    def losses(self, h0_BSD: Tensor, targets_BS: Tensor, embedding_VD: Tensor, head_VD: Tensor) -> list[Tensor]:
        """The per-depth mean cross entropies ``[L_1, .., L_D]`` from ``h_0`` and the targets."""
        S = targets_BS.shape[1]
        if S <= len(self.depths):
            raise ValueError(
                f"sequence length {S} leaves no position for MTP depth {len(self.depths)}: sequences must be longer "
                f"than model.mtp_layers={len(self.depths)}"
            )
        known_BS = targets_BS != IGNORE_INDEX
        ids_BS = targets_BS.masked_fill(~known_BS, 0)  # an unknown input token: embedded as id 0, its loss ignored
        h_BPD, out = h0_BSD, []
        for k, module in enumerate(self.depths, start=1):
            P = S - k
            emb_BPD = F.embedding(ids_BS[:, k - 1 : k - 1 + P], embedding_VD)  # Emb(t[i + k])
            h_BPD = module(h_BPD[:, :P], emb_BPD)
            target_BP = targets_BS[:, k:].masked_fill(~known_BS[:, k - 1 : k - 1 + P], IGNORE_INDEX)  # t[i + k + 1]
            out.append(lm_loss(F.linear(h_BPD, head_VD), target_BP))
        return out

    def weighted_loss(self, targets_BS: Tensor, embedding_VD: Tensor, head_VD: Tensor) -> Tensor:
        """``mtp_loss_weight / N * sum_k L_k`` from the ``h_0`` kept by the last training forward (used once)."""
        if self._h0_BSD is None:
            raise RuntimeError(
                "no hidden state kept for the MTP loss: call it once after each forward in training mode"
            )
        h0_BSD, self._h0_BSD = self._h0_BSD, None
        losses = self.losses(h0_BSD, targets_BS, embedding_VD, head_VD)
        return torch.stack(losses).sum() * (self.config.mtp_loss_weight / len(losses))


# ---------------------------------------------------------------------------------------- pipeline


class MTPLoss:
    """The last pipeline stage's ``loss_fn``: the LM loss plus, in training, the weighted MTP loss.

    Keeps the detached sums of both parts over the micro-batches since :meth:`take_sums`, for logging.
    A plain object, not a module: the stack, embedding and head it reads are the stage's own.
    """

    def __init__(self, stack: MTPStack, embedding: TokenEmbedding, head: nn.Module) -> None:
        self.stack, self.embedding, self.head = stack, embedding, head
        self._sums: Tensor | None = None  # on the loss's device: no host sync per micro-batch
        self._count = 0

    def __call__(self, logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
        lm = lm_loss(logits_BSV, targets_BS)
        if not self.stack.training:
            return lm
        mtp = self.stack.weighted_loss(targets_BS, self.embedding.weight, self.head.weight)
        parts = torch.stack((lm.detach(), mtp.detach())).double()
        self._sums = parts if self._sums is None else self._sums + parts
        self._count += 1
        return lm + mtp

    def take_sums(self) -> tuple[Tensor, int]:
        """``([sum of LM losses, sum of weighted MTP losses], micro-batches)`` since the last call."""
        sums, count = self._sums, self._count
        self._sums, self._count = None, 0
        return (torch.zeros(2, dtype=torch.float64) if sums is None else sums), count


def pipeline_loss_parts(
    module: nn.Module, pp_group: ProcessGroup, dp_group: ProcessGroup | None
) -> tuple[float, float]:
    """``(LM loss, weighted MTP loss)`` of the last ``train_batch``, averaged over its micro-batches
    and the data-parallel ranks, on every rank of a ``decoder_pipeline`` with MTP (two tiny
    all-reduces: over the pipeline stages, where only the last holds the values, then over DP)."""
    import torch.distributed as dist

    loss_fn = getattr(module, "loss_fn", None)
    sums, count = loss_fn.take_sums() if isinstance(loss_fn, MTPLoss) else (torch.zeros(2, dtype=torch.float64), 0)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    held = torch.tensor([float(count > 0)], dtype=torch.float64, device=device)
    parts = torch.cat((sums.to(device) / max(count, 1), held))
    dist.all_reduce(parts, group=pp_group)
    if dp_group is not None:
        dist.all_reduce(parts, group=dp_group)
    lm, mtp, holders = parts.tolist()
    return lm / holders, mtp / holders
