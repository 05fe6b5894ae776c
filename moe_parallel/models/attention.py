"""The decoder's attention layers: grouped-query attention and DeepSeek's multi-head latent attention.

Per layer (``DecoderConfig.layer_types``) attention is causal over the whole sequence, over a sliding
window of the last ``sliding_window`` positions (Mixtral, Qwen, GPT-OSS), or within fixed chunks of
``attention_chunk_size`` positions (Llama 4's local layers). Optional per-layer parts: RoPE or none
(Llama 4's NoPE layers, which may scale queries by position: attention temperature tuning), q/k RMS
norms, and learned attention sinks (GPT-OSS: one extra logit per head that takes softmax mass and
contributes no value).

Shape suffixes: B batch, S sequence, D hidden, H query heads, G key/value heads, A head dim,
R rotary dim, N no-RoPE (content) part of a latent-attention head, V value head dim, L latent rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gpt import _normal_
from .rope import apply_rotary, rotary_cos_sin, yarn_mscale

if TYPE_CHECKING:
    from .decoder import DecoderConfig

# The latent norms of DeepSeek's attention use a fixed epsilon, not the model's rms_norm_eps (as
# DeepSeek's reference code and transformers build them).
LATENT_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    """``weight * normalise(x)``, normalised in float32 then cast back (as Llama-family models do).

    ``weight=False`` gives Llama 4's weightless q/k norm.
    """

    def __init__(self, dim: int, eps: float = 1e-6, weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) if self.weight is None else self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}" + ("" if self.weight is not None else ", weightless")


def attention_mask(config: DecoderConfig, layer_number: int, seq_len: int, device: torch.device) -> Tensor | None:
    """``allowed_SS`` (query row, key column) of a windowed or chunked layer; None for plain causal."""
    kind = config.layer_type(layer_number)
    if kind == "full_attention":
        return None
    q_S1 = torch.arange(seq_len, device=device)[:, None]
    k_1S = torch.arange(seq_len, device=device)[None, :]
    allowed = k_1S <= q_S1
    if kind == "sliding_attention":
        return allowed & (k_1S > q_S1 - config.sliding_window)
    return allowed & (k_1S // config.attention_chunk_size == q_S1 // config.attention_chunk_size)


def attend(
    q_BHSA: Tensor, k_BHSA: Tensor, v_BHSV: Tensor, allowed_SS: Tensor | None, scale: float, sinks_H: Tensor | None
) -> Tensor:
    """Causal softmax attention (``allowed_SS`` narrows it); ``sinks_H`` adds one logit per head that
    takes probability mass and returns nothing."""
    if sinks_H is None:
        if allowed_SS is None:
            return F.scaled_dot_product_attention(q_BHSA, k_BHSA, v_BHSV, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q_BHSA, k_BHSA, v_BHSV, attn_mask=allowed_SS, scale=scale)
    B, H, S, _ = q_BHSA.shape
    if allowed_SS is None:
        allowed_SS = torch.ones(S, S, dtype=torch.bool, device=q_BHSA.device).tril()
    scores_BHSS = (q_BHSA @ k_BHSA.transpose(-1, -2)) * scale
    scores_BHSS = scores_BHSS.masked_fill(~allowed_SS, float("-inf"))
    sink_BHS1 = sinks_H.to(scores_BHSS.dtype).view(1, H, 1, 1).expand(B, H, S, 1)
    probs = torch.cat((scores_BHSS, sink_BHS1), dim=-1).softmax(dim=-1)[..., :-1]
    return probs.to(v_BHSV.dtype) @ v_BHSV


class _AttentionBase(nn.Module):
    """What both attention kinds share: the layer's RoPE tables, mask, sinks and output projection."""

    def __init__(self, config: DecoderConfig, layer_number: int, rotary_dim: int) -> None:
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.rotary_dim = rotary_dim
        self.uses_rope = config.uses_rope(layer_number)
        self._tables: tuple[tuple, tuple[Tensor, Tensor], Tensor | None] | None = None

    def _add_output(self, in_features: int) -> None:
        """The output projection and the sinks, registered after the input projections (the order
        of a layer's parameters is the order of its state dict)."""
        self.o_proj = nn.Linear(in_features, self.config.hidden_size, bias=self.config.o_bias)
        self.sinks = nn.Parameter(torch.zeros(self.config.num_heads)) if self.config.attention_sinks else None

    def tables(
        self, seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[tuple[Tensor, Tensor], Tensor | None]:
        """``((cos_SR, sin_SR), allowed_SS)`` for this layer, kept from the last forward of the same
        length (eager only: a compiled graph computes them in place, fused)."""
        cfg = self.config

        def build():
            rope = rotary_cos_sin(self.rotary_dim, cfg.rope_theta, cfg.rope_scaling, seq_len, device, dtype)
            return rope, attention_mask(cfg, self.layer_number, seq_len, device)

        if torch.compiler.is_compiling():
            return build()
        key = (seq_len, device, dtype)
        if self._tables is None or self._tables[0] != key:
            self._tables = (key, *build())
        return self._tables[1], self._tables[2]

    def temperature(self, q_BHSA: Tensor) -> Tensor:
        """Llama 4's attention temperature tuning on NoPE layers: queries grow with log(position)."""
        cfg = self.config
        if cfg.temperature_floor_scale is None or self.uses_rope:
            return q_BHSA
        positions = torch.arange(q_BHSA.shape[2], device=q_BHSA.device, dtype=torch.float)
        scale_S = (
            torch.log1p(torch.floor((positions + 1.0) / cfg.temperature_floor_scale)) * cfg.temperature_scale + 1.0
        )
        return (q_BHSA * scale_S[:, None]).to(q_BHSA.dtype)


class Attention(_AttentionBase):
    """Causal grouped-query self-attention with RoPE, through ``scaled_dot_product_attention``."""

    def __init__(self, config: DecoderConfig, layer_number: int) -> None:
        D, H, G, A = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        super().__init__(config, layer_number, config.rotary_dim)
        self.q_proj = nn.Linear(D, H * A, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, G * A, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, G * A, bias=config.qkv_bias)
        self._add_output(H * A)
        self.q_norm = self.k_norm = None
        if config.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(A, config.norm_eps), RMSNorm(A, config.norm_eps)
        elif config.qk_norm == "projection":
            self.q_norm, self.k_norm = RMSNorm(H * A, config.norm_eps), RMSNorm(G * A, config.norm_eps)
        self.rope_qk_norm = (
            RMSNorm(A, config.norm_eps, weight=False) if config.qk_norm == "weightless" and self.uses_rope else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg, prefix = self.config, f"blocks.{self.layer_number}.attn"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(self, name)
            _normal_(linear.weight, cfg.init_std, cfg.init_seed, f"{prefix}.{name}.weight")
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    def forward(self, x_BSD: Tensor) -> Tensor:
        cfg = self.config
        B, S, _ = x_BSD.shape
        H, G, A = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if cfg.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.qkv_clip is not None:
            q, k, v = (t.clamp(-cfg.qkv_clip, cfg.qkv_clip) for t in (q, k, v))
        q_BSHA, k_BSGA, v_BSGA = q.view(B, S, H, A), k.view(B, S, G, A), v.view(B, S, G, A)
        if cfg.qk_norm == "head":
            q_BSHA, k_BSGA = self.q_norm(q_BSHA), self.k_norm(k_BSGA)
        q_BHSA, k_BGSA, v_BGSA = (t.transpose(1, 2) for t in (q_BSHA, k_BSGA, v_BSGA))
        (cos_SR, sin_SR), allowed_SS = self.tables(S, x_BSD.device, q_BHSA.dtype)
        if self.uses_rope:
            q_BHSA = apply_rotary(q_BHSA, cos_SR, sin_SR, cfg.rope_interleave)
            k_BGSA = apply_rotary(k_BGSA, cos_SR, sin_SR, cfg.rope_interleave)
        if self.rope_qk_norm is not None:  # Llama 4: after RoPE, on RoPE layers only
            q_BHSA, k_BGSA = self.rope_qk_norm(q_BHSA), self.rope_qk_norm(k_BGSA)
        q_BHSA = self.temperature(q_BHSA)
        if G != H:  # each key/value head serves H / G query heads
            k_BGSA = k_BGSA.repeat_interleave(H // G, dim=1)
            v_BGSA = v_BGSA.repeat_interleave(H // G, dim=1)
        o_BHSA = attend(q_BHSA, k_BGSA, v_BGSA, allowed_SS, A**-0.5, self.sinks)
        return self.o_proj(o_BHSA.transpose(1, 2).reshape(B, S, H * A))


class LatentAttention(_AttentionBase):
    """DeepSeek's multi-head latent attention (MLA).

    Queries come from ``q_proj`` or, with ``q_lora_rank``, a low-rank ``q_a_proj -> norm -> q_b_proj``;
    keys and values from one latent per token (``kv_a_proj_with_mqa`` -> ``kv_lora_rank`` latent,
    normed, -> ``kv_b_proj``) plus one RoPE key part shared by all heads. A head's query/key is
    ``[content (qk_nope_head_dim) | rotary (qk_rope_head_dim)]``; its value has ``v_head_dim``.
    The softmax scale is ``(nope + rope)^-0.5``, times YaRN's ``mscale(factor, mscale_all_dim)^2``.
    """

    def __init__(self, config: DecoderConfig, layer_number: int) -> None:
        D, H = config.hidden_size, config.num_heads
        N, R, V, L = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
        super().__init__(config, layer_number, R)
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * (N + R), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=config.qkv_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * (N + R), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, L + R, bias=config.qkv_bias)
        self.kv_a_layernorm = RMSNorm(L, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(L, H * (N + V), bias=False)
        self._add_output(H * V)
        self.scale = (N + R) ** -0.5
        scaling = config.rope_scaling
        if scaling is not None and scaling["rope_type"] == "yarn" and scaling.get("mscale_all_dim"):
            self.scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg, prefix = self.config, f"blocks.{self.layer_number}.attn"
        for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            linear = getattr(self, name)
            if linear is None:
                continue
            _normal_(linear.weight, cfg.init_std, cfg.init_seed, f"{prefix}.{name}.weight")
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    def forward(self, x_BSD: Tensor) -> Tensor:
        cfg = self.config
        B, S, _ = x_BSD.shape
        H, N, R, V, L = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q = self.q_proj(x_BSD) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_BHSA = q.view(B, S, H, N + R).transpose(1, 2)
        latent_BSL, k_rot_BSR = self.kv_a_proj_with_mqa(x_BSD).split([L, R], dim=-1)
        kv_BHSA = self.kv_b_proj(self.kv_a_layernorm(latent_BSL)).view(B, S, H, N + V).transpose(1, 2)
        k_nope_BHSN, v_BHSV = kv_BHSA.split([N, V], dim=-1)
        (cos_SR, sin_SR), allowed_SS = self.tables(S, x_BSD.device, q_BHSA.dtype)
        q_nope_BHSN, q_rot_BHSR = q_BHSA.split([N, R], dim=-1)
        k_rot_B1SR = k_rot_BSR.view(B, 1, S, R)
        if self.uses_rope:
            q_rot_BHSR = apply_rotary(q_rot_BHSR, cos_SR, sin_SR, cfg.rope_interleave)
            k_rot_B1SR = apply_rotary(k_rot_B1SR, cos_SR, sin_SR, cfg.rope_interleave)
        q_BHSA = torch.cat((q_nope_BHSN, q_rot_BHSR), dim=-1)
        k_BHSA = torch.cat((k_nope_BHSN, k_rot_B1SR.expand(B, H, S, R)), dim=-1)
        o_BHSV = attend(q_BHSA, k_BHSA, v_BHSV, allowed_SS, self.scale, self.sinks)
        return self.o_proj(o_BHSV.transpose(1, 2).reshape(B, S, H * V))
