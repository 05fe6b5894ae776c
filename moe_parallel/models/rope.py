"""Rotary position embeddings: frequencies (default, linear, Llama 3.1, YaRN), tables and rotation.

Two layouts of the rotated features exist among the open models: the half-split one (feature ``j``
pairs with ``j + R/2``: Llama, Qwen, Mixtral, GPT-OSS) and the interleaved one (``2j`` pairs with
``2j + 1``: DeepSeek's ``rope_interleave``, Llama 4's complex pairs). :func:`apply_rotary` does
both; the interleaved form returns the rotated pairs de-interleaved (evens then odds), as
transformers does: q and k are permuted alike, so their dot products are unchanged.

Shape suffixes: S sequence, R rotary dim (the rotated features of a head), B batch, H heads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

# Keys each scaled RoPE type needs, and the optional ones it reads.
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
ROPE_OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "llama3": (),
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(factor) + 1`` (1 for ``factor <= 1``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """The factor YaRN multiplies cos and sin by (1 for other types): ``attention_factor`` if given,
    else the ratio of the two mscales when both are set, else ``mscale(factor)``."""
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def inverse_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None, device=None) -> Tensor:
    """The ``dim // 2`` rotation frequencies, scaled as ``scaling`` says."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device, torch.float) / dim))
    if scaling is None:
        return inv_freq
    kind, factor = scaling["rope_type"], scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    if kind == "yarn":
        return _yarn_frequencies(inv_freq, dim, theta, scaling)
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, blended, scaled)


def _yarn_frequencies(inv_freq: Tensor, dim: int, theta: float, scaling: dict[str, Any]) -> Tensor:
    """YaRN: interpolate the slow frequencies by ``factor``, keep the fast ones, blend linearly in
    between; the blend's ends are the dimensions that turn ``beta_fast`` / ``beta_slow`` times over
    the original context."""
    factor, context = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dimension_of(rotations: float) -> float:
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a single-dimension ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(inv_freq.device)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return (inv_freq / factor) * (1 - keep) + inv_freq * keep


def rotary_cos_sin(
    dim: int,
    theta: float,
    scaling: dict[str, Any] | None,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """``cos_SR, sin_SR`` of positions ``0..seq_len-1`` (frequencies repeated twice, times YaRN's
    attention factor)."""
    inv_freq = inverse_frequencies(dim, theta, scaling, device)
    freqs_SR = torch.arange(seq_len, device=device, dtype=torch.float)[:, None] * inv_freq
    emb_SR = torch.cat((freqs_SR, freqs_SR), dim=-1)
    factor = rope_attention_factor(scaling)
    cos, sin = emb_SR.cos(), emb_SR.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(x_BHSA: Tensor, cos_SR: Tensor, sin_SR: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate the first R features of each head; the rest pass through.

    Half-split: feature ``j`` pairs with ``j + R/2``. Interleaved: ``2j`` with ``2j + 1``, returned
    as evens then odds (see the module docstring).
    """
    rot = cos_SR.shape[-1]
    x_rot = x_BHSA[..., :rot]
    half = rot // 2
    if interleaved:
        cos, sin = cos_SR[..., :half], sin_SR[..., :half]
        even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    else:
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        out = x_rot * cos_SR + rotated * sin_SR
    if rot == x_BHSA.shape[-1]:  # every feature rotates: nothing passes through
        return out
    return torch.cat((out, x_BHSA[..., rot:]), dim=-1)


def validate_rope_scaling(scaling: Any, fail) -> dict[str, Any] | None:
    """``scaling`` as a plain dict, or ``fail("rope_scaling", value, why)`` naming what is wrong."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict) and hasattr(scaling, "items"):
        scaling = dict(scaling.items())
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING_KEYS:
        fail("rope_scaling", scaling, f"give None or a dict with rope_type in {sorted(ROPE_SCALING_KEYS)}")
    missing = [key for key in ROPE_SCALING_KEYS[kind] if key not in scaling]
    if missing:
        fail("rope_scaling", scaling, f"rope_type={kind!r} needs {missing}")
    unknown = sorted(set(scaling) - {"rope_type", *ROPE_SCALING_KEYS[kind], *ROPE_OPTIONAL_KEYS[kind]})
    if unknown:
        fail("rope_scaling", scaling, f"rope_type={kind!r} does not read {unknown}")
    if not scaling["factor"] > 0:
        fail("rope_scaling", scaling, "factor must be > 0")
    return scaling
