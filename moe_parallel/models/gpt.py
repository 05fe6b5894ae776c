"""Reference GPT-style MoE language model, as a plain module (PP=1) and as a DeepSpeed pipeline.

Both forms are built from the same layer classes, in the same order (the pipeline by
:func:`moe_parallel.integration.pipeline.gpt_pipeline`); pipeline layer ``idx`` is:

    0            TokenEmbedding      tokens_BS -> x_BSD        (tied with the LM head if tie_embeddings)
    1            PositionEmbedding   x_BSD -> x_BSD            (learned absolute positions, dropout)
    2 + i        TransformerBlock i  x_BSD -> x_BSD            (pre-norm; MoE FFN iff config.is_moe_layer(i))
    L + 2        FinalNorm           x_BSD -> x_BSD
    L + 3        LMHead              x_BSD -> logits_BSV       (the tied embedding's ``logits`` if tied)

Only one activation tensor crosses each layer boundary, hence each pipeline stage boundary: the MoE
aux losses reach the gradient inside their own stage (``attach_aux_loss``), and positions are
recomputed from the sequence length. Every parameter is initialised from a seed derived from
(``init_seed``, its name in the plain model, which contains the *global* block index), never from the
global RNG: the plain model and a pipeline with any number of stages hold identical weights.

Shape suffixes: B batch, S sequence, D hidden, V vocabulary, H attention heads, A head dim, F FFN dim.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.comm import ProcessGroup
from ..core.config import ACTIVATIONS, Activation, MoEConfig
from ..core.layer import MoELayer, moe_layers  # noqa: F401 (moe_layers is re-exported by models)
from ..experts import activate

NormKind = Literal["rmsnorm", "layernorm"]
NORM_KINDS = ("rmsnorm", "layernorm")


class GPTConfigError(ValueError):
    """A GPT configuration value is out of range; the message names the field and the fix."""


@dataclass
class GPTConfig:
    """Shape and behaviour of the reference GPT.

    Block ``i`` (0-based, global) holds an MoE FFN iff ``moe_every > 0 and (i + 1) % moe_every == 0``:
    ``moe_every=1`` makes every block MoE, ``moe_every=2`` blocks 1, 3, 5, ... and ``moe_every=0``
    none (a dense model). ``moe`` is an :class:`MoEConfig` or a dict of its fields (e.g. from Hydra);
    from a dict, ``hidden_size``, ``ffn_hidden_size``, ``activation``, ``init_std`` and ``init_seed``
    default to this config's values, and the experts' output weights get the dense blocks' residual
    init (``output_init_std = init_std / sqrt(2 * num_layers)``). After construction ``moe`` is
    always an ``MoEConfig`` (or None when ``moe_every == 0`` and none was given).
    """

    vocab_size: int
    seq_len: int
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    moe_every: int = 1
    moe: MoEConfig | dict[str, Any] | None = None
    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    activation: Activation = "gelu"  # of the dense FFN blocks
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    init_seed: int = 1234

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`GPTConfigError` naming the first bad field and how to fix it."""

        def fail(name: str, value: Any, allowed: str) -> None:
            raise GPTConfigError(f"model.{name}={value!r} is invalid: {allowed}")

        for name in ("vocab_size", "seq_len", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, value, "must be a positive integer")
        if self.hidden_size % self.num_heads != 0:
            fail("num_heads", self.num_heads, f"must divide hidden_size={self.hidden_size}")
        if not isinstance(self.moe_every, int) or isinstance(self.moe_every, bool) or self.moe_every < 0:
            fail("moe_every", self.moe_every, "must be an integer >= 0 (0: no MoE blocks, k: every k-th block)")
        if self.norm not in NORM_KINDS:
            fail("norm", self.norm, f"choose one of {NORM_KINDS}")
        if not self.norm_eps > 0:
            fail("norm_eps", self.norm_eps, "must be > 0")
        if self.activation not in ACTIVATIONS:
            fail("activation", self.activation, f"choose one of {ACTIVATIONS}")
        if not isinstance(self.tie_embeddings, bool):
            fail("tie_embeddings", self.tie_embeddings, "must be true or false")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", self.dropout, "must be in [0, 1)")
        if not self.init_std > 0:
            fail("init_std", self.init_std, "must be > 0")
        if not isinstance(self.init_seed, int) or isinstance(self.init_seed, bool):
            fail("init_seed", self.init_seed, "must be an integer")
        self.moe = self._resolve_moe()

    def _resolve_moe(self) -> MoEConfig | None:
        moe = self.moe
        if moe is None:
            if self.moe_every > 0:
                raise GPTConfigError(
                    f"model.moe is missing but model.moe_every={self.moe_every} asks for MoE blocks: give "
                    "moe={'num_experts': ..., ...} (an MoEConfig or its fields), or set moe_every=0"
                )
            return None
        if isinstance(moe, MoEConfig):
            if moe.hidden_size != self.hidden_size:
                raise GPTConfigError(
                    f"model.moe.hidden_size={moe.hidden_size} must equal model.hidden_size={self.hidden_size}: "
                    "give moe as a dict to inherit it, or make them equal"
                )
            return moe
        if not isinstance(moe, dict) and hasattr(moe, "items"):
            moe = dict(moe.items())  # a Hydra DictConfig or another mapping
        if not isinstance(moe, dict):
            raise GPTConfigError(f"model.moe={moe!r} is invalid: give an MoEConfig or a dict of its fields")
        known = {f.name for f in fields(MoEConfig)}
        unknown = sorted(set(moe) - known)
        if unknown:
            raise GPTConfigError(
                f"model.moe has unknown field(s) {unknown}: the fields of MoEConfig are {sorted(known)}"
            )
        if "num_experts" not in moe:
            raise GPTConfigError("model.moe.num_experts is missing: set the number of experts per MoE layer")
        if moe.get("hidden_size", self.hidden_size) != self.hidden_size:
            raise GPTConfigError(
                f"model.moe.hidden_size={moe['hidden_size']} must equal model.hidden_size={self.hidden_size}: "
                "leave it out to inherit it"
            )
        inherited = {
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "activation": self.activation,
            "init_std": self.init_std,
            "output_init_std": _residual_std(self),  # experts' fc2, as the dense fc2
            "init_seed": self.init_seed,
        }
        return MoEConfig(**{**inherited, **moe})  # MoEConfigError names the bad moe.* field

    def is_moe_layer(self, layer_number: int) -> bool:
        """Whether global block ``layer_number`` (0-based) holds an MoE FFN."""
        return self.moe_every > 0 and (layer_number + 1) % self.moe_every == 0

    @property
    def moe_layer_numbers(self) -> list[int]:
        """Global indices of the MoE blocks."""
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------- init


def param_seed(init_seed: int, name: str) -> int:
    """Seed of one non-MoE parameter: a hash of (init_seed, its plain-model name).

    The name holds the global block index (``blocks.3.attn.qkv.weight``), so the seed does not depend
    on the pipeline stage or on the global RNG; hashing keeps it apart from the MoE layers' seeds.
    """
    digest = hashlib.sha256(f"moe_parallel.gpt/{init_seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def _normal_(param: Tensor, std: float, init_seed: int, name: str) -> None:
    gen = torch.Generator().manual_seed(param_seed(init_seed, name))
    # Drawn on CPU in float32, then copied: same values whatever the parameter's device or dtype.
    param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=gen))


# ---------------------------------------------------------------------------------------- norm


def _fused_norm_classes() -> dict[str, type[nn.Module]] | None:
    """Apex's fused norms if apex *with its CUDA extension* is importable and CUDA is available."""
    if not torch.cuda.is_available():
        return None
    try:
        from apex.normalization import FusedLayerNorm, FusedRMSNorm

        # The Python-only apex build imports fine but fails when a norm is constructed: ask for the kernels.
        importlib.import_module("fused_layer_norm_cuda")
    except ImportError:
        return None
    return {"layernorm": FusedLayerNorm, "rmsnorm": FusedRMSNorm}


def make_norm(kind: NormKind, dim: int, eps: float = 1e-5) -> nn.Module:
    """An RMSNorm or LayerNorm over the last ``dim`` features: apex's fused one where usable, else torch's.

    Both implementations name their parameters ``weight`` (and ``bias`` for LayerNorm), so state
    dicts move between machines with and without apex.
    """
    if kind not in NORM_KINDS:
        raise GPTConfigError(f"model.norm={kind!r} is invalid: choose one of {NORM_KINDS}")
    fused = _fused_norm_classes()
    if fused is not None:
        return fused[kind](dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)


# ---------------------------------------------------------------------------------------- layers


class TokenEmbedding(nn.Module):
    """Token ids ``[B, S]`` -> ``x_BSD``; with tied embeddings also the LM head (:meth:`logits`)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _normal_(self.weight, self.config.init_std, self.config.init_seed, "embed.weight")

    def forward(self, tokens_BS: Tensor) -> Tensor:
        if tokens_BS.dim() != 2 or tokens_BS.is_floating_point() or tokens_BS.is_complex():
            raise ValueError(
                f"tokens must be an integer tensor [batch, seq]; got dtype {tokens_BS.dtype}, "
                f"shape {tuple(tokens_BS.shape)}"
            )
        return F.embedding(tokens_BS, self.weight)

    def logits(self, x_BSD: Tensor) -> Tensor:
        """Tied LM head: ``x_BSD @ weight.T``."""
        return F.linear(x_BSD, self.weight)


class PositionEmbedding(nn.Module):
    """Adds learned absolute position embeddings, then embedding dropout."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.seq_len, config.hidden_size))
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _normal_(self.weight, self.config.init_std, self.config.init_seed, "pos_embed.weight")

    def forward(self, x_BSD: Tensor) -> Tensor:
        seq = x_BSD.shape[1]
        if seq > self.config.seq_len:
            raise ValueError(
                f"sequence length {seq} exceeds model.seq_len={self.config.seq_len}: "
                "shorten the inputs or raise seq_len"
            )
        return self.dropout(x_BSD + self.weight[:seq])


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention(is_causal=True)``."""

    def __init__(self, config: GPTConfig, layer_number: int) -> None:
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg, prefix = self.config, f"blocks.{self.layer_number}.attn"
        _normal_(self.qkv.weight, cfg.init_std, cfg.init_seed, f"{prefix}.qkv.weight")
        _normal_(self.proj.weight, _residual_std(cfg), cfg.init_seed, f"{prefix}.proj.weight")

    def forward(self, x_BSD: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        H = self.num_heads
        qkv_BS3HA = self.qkv(x_BSD).view(B, S, 3, H, D // H)
        q_BHSA, k_BHSA, v_BHSA = qkv_BS3HA.permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.config.dropout if self.training else 0.0
        o_BHSA = F.scaled_dot_product_attention(q_BHSA, k_BHSA, v_BHSA, dropout_p=dropout_p, is_causal=True)
        return self.proj(o_BHSA.transpose(1, 2).reshape(B, S, D))


def _residual_std(config: GPTConfig) -> float:
    # GPT-2: projections into the residual stream shrink with depth so its variance stays O(1).
    return config.init_std / math.sqrt(2 * config.num_layers)


class DenseFFN(nn.Module):
    """The FFN of a non-MoE block: ``fc2(act(fc1(x)))`` (fc1 is twice as wide for swiglu)."""

    def __init__(self, config: GPTConfig, layer_number: int) -> None:
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        up = 2 * config.ffn_hidden_size if config.activation == "swiglu" else config.ffn_hidden_size
        self.fc1 = nn.Linear(config.hidden_size, up, bias=False)
        self.fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg, prefix = self.config, f"blocks.{self.layer_number}.ffn"
        _normal_(self.fc1.weight, cfg.init_std, cfg.init_seed, f"{prefix}.fc1.weight")
        _normal_(self.fc2.weight, _residual_std(cfg), cfg.init_seed, f"{prefix}.fc2.weight")

    def forward(self, x_BSD: Tensor) -> Tensor:
        return self.fc2(activate(self.fc1(x_BSD), self.config.activation))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``; the FFN is MoE or dense.

    ``layer_number`` is the *global* block index: it decides MoE placement and seeds every
    parameter, so the block is the same whichever pipeline stage builds it. ``ep_group`` is only
    used by MoE blocks.
    """

    def __init__(self, config: GPTConfig, layer_number: int, ep_group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.is_moe = config.is_moe_layer(layer_number)
        self.norm1 = make_norm(config.norm, config.hidden_size, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_number)
        self.norm2 = make_norm(config.norm, config.hidden_size, config.norm_eps)
        self.ffn: nn.Module
        if self.is_moe:
            assert config.moe is not None  # validated by GPTConfig
            self.ffn = MoELayer(config.moe, ep_group, layer_number)
        else:
            self.ffn = DenseFFN(config, layer_number)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x_BSD: Tensor) -> Tensor:
        x_BSD = x_BSD + self.dropout(self.attn(self.norm1(x_BSD)))
        # In training the MoE layer attaches its aux loss to this output: nothing else leaves the block.
        return x_BSD + self.dropout(self.ffn(self.norm2(x_BSD)))


class FinalNorm(nn.Module):
    """The norm after the last block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm = make_norm(config.norm, config.hidden_size, config.norm_eps)

    def forward(self, x_BSD: Tensor) -> Tensor:
        return self.norm(x_BSD)


class LMHead(nn.Module):
    """Untied output projection ``x_BSD -> logits_BSV`` (no bias)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _normal_(self.weight, self.config.init_std, self.config.init_seed, "lm_head.weight")

    def forward(self, x_BSD: Tensor) -> Tensor:
        return F.linear(x_BSD, self.weight)


def lm_loss(logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
    """Mean next-token cross entropy in float32; targets equal to -100 are ignored."""
    return F.cross_entropy(logits_BSV.float().flatten(0, -2), targets_BS.reshape(-1), ignore_index=-100)


# ---------------------------------------------------------------------------------------- plain model


class GPT(nn.Module):
    """The reference model as one module (pipeline-parallel size 1).

    ``forward(tokens_BS) -> logits_BSV``. Submodules: ``embed``, ``pos_embed``, ``blocks[i]``,
    ``final_norm`` and ``lm_head`` (None with tied embeddings: the logits then use ``embed.weight``).
    ``ep_group`` splits the experts of every MoE block (see :class:`MoELayer`).
    """

    def __init__(self, config: GPTConfig, ep_group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = TokenEmbedding(config)
        self.pos_embed = PositionEmbedding(config)
        self.blocks = nn.ModuleList(TransformerBlock(config, i, ep_group) for i in range(config.num_layers))
        self.final_norm = FinalNorm(config)
        self.lm_head = None if config.tie_embeddings else LMHead(config)

    @property
    def lm_head_weight(self) -> Tensor:
        """The ``[V, D]`` output projection: ``embed.weight`` itself when embeddings are tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, tokens_BS: Tensor) -> Tensor:
        x_BSD = self.pos_embed(self.embed(tokens_BS))
        for block in self.blocks:
            x_BSD = block(x_BSD)
        x_BSD = self.final_norm(x_BSD)
        return self.embed.logits(x_BSD) if self.lm_head is None else self.lm_head(x_BSD)

    @staticmethod
    def loss(logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
        """Mean cross entropy (see :func:`lm_loss`); the MoE aux losses are already in the gradient."""
        return lm_loss(logits_BSV, targets_BS)


# ---------------------------------------------------------------------------------------- pipeline layer order


def pipeline_layer_names(config: GPTConfig) -> list[str]:
    """Plain-model prefix of each pipeline layer: entry ``idx`` is pipeline layer ``idx``.

    DeepSpeed names the parameters of layer ``idx`` ``f"{idx}.{rest}"`` (its checkpoint file is
    ``layer_{idx:02d}-model_states.pt`` with the layer's own names), except the tied embedding,
    which it names ``tied_modules.embed.{rest}``; the tied LM head (last entry) has no parameters.
    """
    blocks = [f"blocks.{i}" for i in range(config.num_layers)]
    return ["embed", "pos_embed", *blocks, "final_norm", "lm_head"]
