"""One decoder family for the open MoE models (Mixtral, Qwen2/3-MoE, OLMoE, GLM-4.5, DeepSeek-V2/V3,
Llama 4, GPT-OSS), configured.

Attention (models/attention.py) is grouped-query attention with a free ``head_dim`` or DeepSeek's
latent attention, with RoPE (full, partial or none per block; half-split or interleaved; scaled
linearly, Llama-3.1 style or by YaRN), optional q/k/v and output biases, q/k RMS norms, sliding-window
or chunked blocks and attention sinks. FFNs are SwiGLU (dense blocks) or :class:`MoELayer` (every
router, expert and shared-expert variant is an :class:`MoEConfig` field). What is not a flag here is
the same in every family: pre-norm blocks, RMSNorm computed in float32.

As the reference GPT, it exists as a plain module and as a DeepSpeed pipeline built from the same
layers (:func:`moe_parallel.integration.pipeline.decoder_pipeline`); pipeline layer ``idx`` is:

    0            TokenEmbedding   tokens_BS -> x_BSD   (tied with the LM head if tie_embeddings)
    1 + i        DecoderBlock i   x_BSD -> x_BSD       (MoE FFN iff config.is_moe_layer(i))
    L + 1        FinalNorm        x_BSD -> x_BSD       (an RMSNorm)
    L + 2        LMHead           x_BSD -> logits_BSV

With multi-token prediction (``mtp_layers > 0``, models/mtp.py) the last stage also holds the MTP
modules, as one pass-through layer ``MTPStack`` after the final norm, and the embedding is a tied
module on the first and the last stage (with an untied head, one more pass-through layer before
the head brings it there); the pipeline's loss function adds the MTP loss on the last stage.

Only ``x_BSD`` crosses layers (positions are recomputed from the sequence length), and every
parameter is seeded by its plain-model name, so any (PP, EP) layout builds the same weights.

Shape suffixes: B batch, S sequence, D hidden, V vocabulary, H query heads, G key/value heads,
A head dim, F FFN dim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..core.comm import ProcessGroup
from ..core.config import MoEConfig
from ..core.layer import MoELayer
from .attention import Attention, LatentAttention, RMSNorm
from .gpt import LMHead, TokenEmbedding, _normal_, lm_loss
from .rope import validate_rope_scaling

QKNorm = Literal["none", "head", "projection", "weightless"]
QK_NORMS = ("none", "head", "projection", "weightless")
AttentionKind = Literal["gqa", "mla"]
ATTENTION_KINDS = ("gqa", "mla")
LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
EXPERT_ACTIVATIONS = ("swiglu", "clamped_swiglu")


class DecoderConfigError(ValueError):
    """A decoder configuration value is out of range; the message names the field and the fix."""


@dataclass
class DecoderConfig:
    """Shape and behaviour of a :class:`Decoder`.

    Block ``i`` holds an MoE FFN iff ``moe_every > 0``, ``(i + 1) % moe_every == 0``,
    ``i >= first_dense_layers`` and ``i not in dense_layers`` (Qwen's ``decoder_sparse_step`` and
    ``mlp_only_layers``, GLM's ``first_k_dense_replace``); other blocks hold a SwiGLU FFN of width
    ``ffn_hidden_size``. ``moe`` is an :class:`MoEConfig` or a dict of its fields; from a dict,
    ``hidden_size``, ``activation`` ("swiglu"), ``init_std`` and ``init_seed`` come from here and
    ``ffn_hidden_size`` defaults to this config's.

    ``hf_model_type`` and ``hf_extra`` are the Hugging Face identity (see ``moe_parallel.hf``):
    the ``model_type`` this model exports as, and config.json keys carried along unchanged
    (token ids, ``max_position_embeddings``, ...). The model itself never reads them.
    """

    vocab_size: int
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    num_kv_heads: int | None = None  # None: num_heads (no grouped-query attention)
    head_dim: int | None = None  # None: hidden_size // num_heads
    moe: MoEConfig | dict[str, Any] | None = None
    moe_every: int = 1
    first_dense_layers: int = 0
    dense_layers: list[int] = field(default_factory=list)
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # rotate the first rotary_fraction * head_dim features of q and k
    # RoPE frequency scaling: None, {"rope_type": "linear", "factor": f}, {"rope_type": "llama3",
    # "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1)
    # or {"rope_type": "yarn", "factor", "original_max_position_embeddings", optional "beta_fast",
    # "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"} (see rope.py).
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = False  # rotate (2j, 2j+1) pairs instead of (j, j + R/2) (DeepSeek, Llama 4)
    nope_layers: list[int] = field(default_factory=list)  # blocks without RoPE (Llama 4)
    qkv_bias: bool = False
    o_bias: bool = False
    # "head": RMSNorm over each head; "projection": over all of q (and k); "weightless": a weightless
    # RMSNorm over each head after RoPE, on RoPE layers only (Llama 4).
    qk_norm: QKNorm = "none"
    qkv_clip: float | None = None  # clamp q, k, v to [-clip, clip] (OLMoE's clip_qkv)
    # Per block: "full_attention" (causal), "sliding_attention" (the last sliding_window positions)
    # or "chunked_attention" (causal within chunks of attention_chunk_size); None: all full.
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    attention_chunk_size: int | None = None
    attention_sinks: bool = False  # a learned per-head logit that takes softmax mass (GPT-OSS)
    # Attention temperature tuning on NoPE layers (Llama 4): queries scaled by
    # 1 + temperature_scale * log(1 + floor((pos + 1) / temperature_floor_scale)); None: off.
    temperature_floor_scale: float | None = None
    temperature_scale: float = 0.1
    # "mla": DeepSeek's multi-head latent attention with the five sizes below (head_dim is then the
    # RoPE part, qk_rope_head_dim); q_lora_rank None projects queries at full rank.
    attention: AttentionKind = "gqa"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Multi-token prediction (DeepSeek-V3): this many MTP modules after the last block, each
    # predicting one token further ahead (see models/mtp.py); 0: none. Training adds
    # mtp_loss_weight times the mean of their losses to the LM loss.
    mtp_layers: int = 0
    mtp_loss_weight: float = 0.1
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    init_seed: int = 1234
    hf_model_type: str | None = None
    hf_extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`DecoderConfigError` naming the first bad field and how to fix it."""

        def fail(name: str, value: Any, allowed: str) -> None:
            raise DecoderConfigError(f"model.{name}={value!r} is invalid: {allowed}")

        def positive_int(name: str, value: Any) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, value, "must be a positive integer")

        for name in ("vocab_size", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size"):
            positive_int(name, getattr(self, name))
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        positive_int("num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads != 0:
            fail("num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                fail("num_heads", self.num_heads, f"must divide hidden_size={self.hidden_size}, or set head_dim")
            self.head_dim = self.hidden_size // self.num_heads
        positive_int("head_dim", self.head_dim)
        if not isinstance(self.moe_every, int) or isinstance(self.moe_every, bool) or self.moe_every < 0:
            fail("moe_every", self.moe_every, "must be an integer >= 0 (0: no MoE blocks, k: every k-th block)")
        if not isinstance(self.first_dense_layers, int) or self.first_dense_layers < 0:
            fail("first_dense_layers", self.first_dense_layers, "must be an integer >= 0")
        self.dense_layers = sorted(int(i) for i in self.dense_layers)
        if any(not 0 <= i < self.num_layers for i in self.dense_layers):
            fail("dense_layers", self.dense_layers, f"must be block indices in [0, {self.num_layers})")
        if not self.rope_theta > 0:
            fail("rope_theta", self.rope_theta, "must be > 0")
        if not 0 < self.rotary_fraction <= 1:
            fail("rotary_fraction", self.rotary_fraction, "must be in (0, 1]")
        if self.attention != "mla" and (self.rotary_dim % 2 or self.rotary_dim == 0):
            fail(
                "rotary_fraction",
                self.rotary_fraction,
                f"gives {self.rotary_dim} rotated features of head_dim={self.head_dim}; it must be even and > 0",
            )
        self.rope_scaling = validate_rope_scaling(self.rope_scaling, fail)
        self.nope_layers = sorted(int(i) for i in self.nope_layers)
        if any(not 0 <= i < self.num_layers for i in self.nope_layers):
            fail("nope_layers", self.nope_layers, f"must be block indices in [0, {self.num_layers})")
        if self.qk_norm not in QK_NORMS:
            fail("qk_norm", self.qk_norm, f"choose one of {QK_NORMS}")
        self._validate_attention_pattern(fail)
        self._validate_latent_attention(fail)
        if self.qkv_clip is not None and not self.qkv_clip > 0:
            fail("qkv_clip", self.qkv_clip, "must be > 0, or None for no clipping")
        if not self.norm_eps > 0:
            fail("norm_eps", self.norm_eps, "must be > 0")
        for name in ("qkv_bias", "o_bias", "tie_embeddings", "rope_interleave", "attention_sinks"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "must be true or false")
        if not self.init_std > 0:
            fail("init_std", self.init_std, "must be > 0")
        if not isinstance(self.mtp_layers, int) or isinstance(self.mtp_layers, bool) or self.mtp_layers < 0:
            fail("mtp_layers", self.mtp_layers, "must be an integer >= 0 (0: no multi-token prediction)")
        weight = self.mtp_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            fail("mtp_loss_weight", weight, "must be a finite number >= 0 (e.g. 0.1, DeepSeek-V3's later value)")
        self.mtp_loss_weight = float(weight)
        if not isinstance(self.hf_extra, dict):
            self.hf_extra = dict(self.hf_extra.items()) if hasattr(self.hf_extra, "items") else self.hf_extra
            if not isinstance(self.hf_extra, dict):
                fail("hf_extra", self.hf_extra, "must be a mapping of config.json keys")
        self.moe = self._resolve_moe()

    def _validate_attention_pattern(self, fail) -> None:
        if self.layer_types is not None:
            self.layer_types = [str(t) for t in self.layer_types]
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
                fail(
                    "layer_types", self.layer_types, f"give one of {LAYER_TYPES} per block ({self.num_layers}), or None"
                )
        kinds = set(self.layer_types or ())
        for kind, name in (("sliding_attention", "sliding_window"), ("chunked_attention", "attention_chunk_size")):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                fail(name, value, "must be a positive integer or None")
            if kind in kinds and value is None:
                fail(name, value, f"layer_types has {kind!r} blocks: set {name}")
        if self.temperature_floor_scale is not None and not self.temperature_floor_scale > 0:
            fail("temperature_floor_scale", self.temperature_floor_scale, "must be > 0, or None for no tuning")

    def _validate_latent_attention(self, fail) -> None:
        if self.attention not in ATTENTION_KINDS:
            fail("attention", self.attention, f"choose one of {ATTENTION_KINDS}")
        if self.attention != "mla":
            return
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, value, "must be a positive integer with attention='mla'")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            fail("q_lora_rank", self.q_lora_rank, "must be a positive integer, or None for full-rank queries")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", self.qk_rope_head_dim, "must be even (RoPE rotates pairs)")
        if self.qk_norm != "none" or self.qkv_clip is not None:
            fail("qk_norm", self.qk_norm, "latent attention has no q/k norm or clip: set none / null")

    def layer_type(self, layer_number: int) -> str:
        """The attention pattern of block ``layer_number`` (an MTP module's block attends to all)."""
        if self.layer_types is None or layer_number >= self.num_layers:
            return "full_attention"
        return self.layer_types[layer_number]

    def uses_rope(self, layer_number: int) -> bool:
        return layer_number not in self.nope_layers

    @property
    def rotary_dim(self) -> int:
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.rotary_fraction)

    def _resolve_moe(self) -> MoEConfig | None:
        moe = self.moe
        if moe is None:
            if self.moe_layer_numbers_unchecked():
                raise DecoderConfigError(
                    f"model.moe is missing but model.moe_every={self.moe_every} asks for MoE blocks: give "
                    "moe={'num_experts': ..., ...} (an MoEConfig or its fields), or set moe_every=0"
                )
            return None
        if isinstance(moe, MoEConfig):
            if moe.hidden_size != self.hidden_size:
                raise DecoderConfigError(
                    f"model.moe.hidden_size={moe.hidden_size} must equal model.hidden_size={self.hidden_size}"
                )
            if moe.activation not in EXPERT_ACTIVATIONS:
                raise DecoderConfigError(
                    f"model.moe.activation={moe.activation!r} is invalid: use one of {EXPERT_ACTIVATIONS}"
                )
            return moe
        if not isinstance(moe, dict) and hasattr(moe, "items"):
            moe = dict(moe.items())
        if not isinstance(moe, dict):
            raise DecoderConfigError(f"model.moe={moe!r} is invalid: give an MoEConfig or a dict of its fields")
        known = {f.name for f in fields(MoEConfig)}
        unknown = sorted(set(moe) - known)
        if unknown:
            raise DecoderConfigError(
                f"model.moe has unknown field(s) {unknown}: the fields of MoEConfig are {sorted(known)}"
            )
        if "num_experts" not in moe:
            raise DecoderConfigError("model.moe.num_experts is missing: set the number of experts per MoE layer")
        if moe.get("hidden_size", self.hidden_size) != self.hidden_size:
            raise DecoderConfigError(
                f"model.moe.hidden_size={moe['hidden_size']!r} must be {self.hidden_size}: leave it out"
            )
        if moe.get("activation", "swiglu") not in EXPERT_ACTIVATIONS:
            raise DecoderConfigError(
                f"model.moe.activation={moe['activation']!r} is invalid: choose one of {EXPERT_ACTIVATIONS}"
            )
        inherited = {
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "activation": "swiglu",
            "init_std": self.init_std,
            "init_seed": self.init_seed,
        }
        return MoEConfig(**{**inherited, **moe})

    def _follows_moe_rule(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0 and i >= self.first_dense_layers

    def moe_layer_numbers_unchecked(self) -> list[int]:
        dense = set(self.dense_layers)
        return [i for i in range(self.num_layers) if self._follows_moe_rule(i) and i not in dense]

    def is_moe_layer(self, layer_number: int) -> bool:
        """Whether global block ``layer_number`` (0-based) holds an MoE FFN.

        The block of MTP module ``k`` is block ``num_layers + k - 1``: MoE by the same rule
        (``moe_every``, ``first_dense_layers``), as DeepSeek-V3 builds its layer 61.
        """
        if layer_number >= self.num_layers:
            return self.moe is not None and self._follows_moe_rule(layer_number)
        return layer_number in self.moe_layer_numbers

    @property
    def mtp_layer_numbers(self) -> list[int]:
        """Global indices of the MTP modules' blocks: ``num_layers .. num_layers + mtp_layers - 1``."""
        return list(range(self.num_layers, self.num_layers + self.mtp_layers))

    @property
    def moe_layer_numbers(self) -> list[int]:
        """Global indices of the MoE blocks."""
        return self.moe_layer_numbers_unchecked() if self.moe is not None else []

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------- layers


class FinalNorm(RMSNorm):
    """The RMSNorm after the last block (its own class: a pipeline layer is built from a class)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config.hidden_size, config.norm_eps)


class SwiGLU(nn.Module):
    """The FFN of a dense block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: DecoderConfig, layer_number: int) -> None:
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        D, F_ = config.hidden_size, config.ffn_hidden_size
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg, prefix = self.config, f"blocks.{self.layer_number}.ffn"
        for name in ("gate_proj", "up_proj", "down_proj"):
            _normal_(getattr(self, name).weight, cfg.init_std, cfg.init_seed, f"{prefix}.{name}.weight")

    def forward(self, x_BSD: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BSD)) * self.up_proj(x_BSD))


class DecoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(attn_norm(x))``, then ``x + ffn(ffn_norm(x))``; the FFN is MoE or SwiGLU.

    ``layer_number`` is the global block index: it decides MoE placement, seeds every parameter and
    numbers the MoE layer (whose experts checkpoints store under it).
    """

    def __init__(self, config: DecoderConfig, layer_number: int, ep_group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.is_moe = config.is_moe_layer(layer_number)
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = (LatentAttention if config.attention == "mla" else Attention)(config, layer_number)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn: nn.Module = (
            MoELayer(config.moe, ep_group, layer_number) if self.is_moe else SwiGLU(config, layer_number)
        )

    def forward(self, x_BSD: Tensor) -> Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


# ---------------------------------------------------------------------------------------- plain model


class Decoder(nn.Module):
    """The decoder as one module (pipeline-parallel size 1): ``forward(tokens_BS) -> logits_BSV``.

    Submodules: ``embed``, ``blocks[i]``, ``final_norm``, ``lm_head`` (None with tied embeddings) and
    ``mtp`` (the multi-token-prediction modules; None without them). ``ep_group`` splits the experts
    of every MoE block (see :class:`MoELayer`). With MTP, a training forward keeps the final hidden
    state for :meth:`mtp_loss`, which the training loss adds (see :meth:`training_loss`).
    """

    def __init__(self, config: DecoderConfig, ep_group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = TokenEmbedding(config)
        self.blocks = nn.ModuleList(DecoderBlock(config, i, ep_group) for i in range(config.num_layers))
        self.final_norm = FinalNorm(config)
        self.lm_head = None if config.tie_embeddings else LMHead(config)
        from .mtp import MTPStack  # mtp.py builds on DecoderBlock

        self.mtp = MTPStack(config, ep_group) if config.mtp_layers > 0 else None

    @property
    def lm_head_weight(self) -> Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, tokens_BS: Tensor) -> Tensor:
        x_BSD = self.embed(tokens_BS)
        for block in self.blocks:
            x_BSD = block(x_BSD)
        x_BSD = self.final_norm(x_BSD)
        if self.mtp is not None:
            x_BSD = self.mtp(x_BSD)  # keeps h_0 (in training) for mtp_loss
        return self.embed.logits(x_BSD) if self.lm_head is None else self.lm_head(x_BSD)

    def mtp_loss(self, targets_BS: Tensor) -> Tensor:
        """The weighted MTP loss ``mtp_loss_weight / mtp_layers * sum_k L_k`` of the last training
        forward, whose targets are ``targets_BS`` (see models/mtp.py)."""
        if self.mtp is None:
            raise RuntimeError("this Decoder has no MTP modules (model.mtp_layers=0): there is no MTP loss")
        return self.mtp.weighted_loss(targets_BS, self.embed.weight, self.lm_head_weight)

    def training_loss(self, logits_BSV: Tensor, targets_BS: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(total, lm, mtp)`` of the last forward: the LM loss, plus in training the weighted MTP
        loss (None without MTP modules or outside training); ``total`` is what to backpropagate."""
        lm = lm_loss(logits_BSV, targets_BS)
        if self.mtp is None or not self.training:
            return lm, lm, None
        mtp = self.mtp_loss(targets_BS)
        return lm + mtp, lm, mtp

    @staticmethod
    def loss(logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
        """Mean cross entropy (see :func:`lm_loss`); the MoE aux losses are already in the gradient."""
        return lm_loss(logits_BSV, targets_BS)


# ---------------------------------------------------------------------------------------- pipeline layer order


def decoder_layer_names(config: DecoderConfig) -> list[str]:
    """Plain-model prefix of each pipeline layer: entry ``idx`` is pipeline layer ``idx``.

    With MTP, ``mtp`` follows ``final_norm``; with an untied head a second ``embed`` (the tied
    embedding, no parameters of its own there) precedes ``lm_head``.
    """
    names = ["embed", *(f"blocks.{i}" for i in range(config.num_layers)), "final_norm"]
    if config.mtp_layers > 0:
        names += ["mtp"] if config.tie_embeddings else ["mtp", "embed"]
    return [*names, "lm_head"]
