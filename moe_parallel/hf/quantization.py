"""Quantized checkpoint formats as published, and their dequantization to bf16.

Two formats are read, both dequantized once on load (the model trains in bf16/fp32):

- FP8 block-scaled (``quant_method: "fp8"``, DeepSeek-V3 / Qwen3-FP8 layout): ``X.weight`` is
  ``F8_E4M3`` ``[..., R, C]`` and ``X.weight_scale_inv`` holds one float per block of
  ``weight_block_size = [b0, b1]`` rows x columns, ``[..., ceil(R / b0), ceil(C / b1)]`` (the last
  block of a row or column is partial). Value = fp8 value x its block's ``scale_inv``.
- MXFP4 (``quant_method: "mxfp4"``, GPT-OSS layout): ``P_blocks`` ``U8 [..., G, 16]`` holds 32 E2M1
  values per group, two per byte, low nibble first; ``P_scales`` ``U8 [..., G]`` is the group's
  E8M0 exponent, scale ``2 ** (s - 127)``. A 3-d result (GPT-OSS's experts ``[E, R, G * 32]``) is
  transposed on its last two dims, as transformers does, to the unquantized checkpoint's layout.

Every other ``quant_method`` (compressed-tensors, bitsandbytes, GPTQ, AWQ, ...) is refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .families import HFConversionError

DEFAULT_BLOCK = (128, 128)
OUTPUT_DTYPE = torch.bfloat16
OUTPUT_DTYPE_NAME = "BF16"
MXFP4_GROUP = 32  # values per E8M0 scale
SUPPORTED = (
    "FP8 block-scaled (quant_method 'fp8': F8_E4M3 weights with a weight_scale_inv per weight_block_size block, "
    "as DeepSeek-V3) and MXFP4 (quant_method 'mxfp4': _blocks / _scales tensors, as GPT-OSS)"
)
_DEQUANTIZE_FIRST = "dequantize the checkpoint to bf16 first (load it in transformers and save_pretrained)"
# E2M1 code -> value: bit 3 is the sign, bits 2-1 the exponent (bias 1), bit 0 the mantissa.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's ``quantization_config``, as far as reading its weights needs it."""

    method: str  # "fp8" or "mxfp4"
    block: tuple[int, int] = DEFAULT_BLOCK  # FP8 rows x columns per scale

    def describe(self) -> str:
        if self.method == "fp8":
            return f"FP8 block-scaled (E4M3, blocks {list(self.block)})"
        return "MXFP4"


def check_quantization(raw_config: dict[str, Any], path: str | Path) -> Quantization | None:
    """The :class:`Quantization` of a config.json (``raw_config``, its parsed dict); None when the
    checkpoint is not quantized. Refuses, naming config.json's key and what is supported, any
    method or FP8 variant that :mod:`quantized_view` cannot dequantize."""
    file = Path(path) / "config.json"
    qc = raw_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise HFConversionError(f"{file}: quantization_config is a JSON {type(qc).__name__}, not an object: fix it")
    method = qc.get("quant_method")
    if method == "mxfp4":
        return Quantization("mxfp4")
    if method != "fp8":
        raise HFConversionError(
            f"{file}: quantization_config.quant_method={method!r} is not supported: supported are {SUPPORTED}; "
            + _DEQUANTIZE_FIRST
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise HFConversionError(
            f"{file}: FP8 quantization_config.fmt={fmt!r} is not supported: only E4M3 (fmt 'e4m3') FP8 weights "
            f"are; supported are {SUPPORTED}; " + _DEQUANTIZE_FIRST
        )
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise HFConversionError(
            f"{file}: FP8 quantization_config.activation_scheme={scheme!r} is not supported: only 'dynamic' "
            "(no stored activation scales) is; " + _DEQUANTIZE_FIRST
        )
    block = qc.get("weight_block_size", list(DEFAULT_BLOCK))
    if not (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise HFConversionError(
            f"{file}: FP8 quantization_config.weight_block_size={block!r} is not supported: only block-scaled FP8 "
            "(weight_block_size [rows, columns], e.g. [128, 128]) is, not per-tensor or per-channel scales; "
            + _DEQUANTIZE_FIRST
        )
    return Quantization("fp8", (block[0], block[1]))


def fp8_scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The ``weight_scale_inv`` shape of an FP8 weight of ``shape``: one scale per (partial) block."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def dequantize_fp8(weight: Tensor, scale_inv: Tensor, block: tuple[int, int], rows_per_chunk: int = 4096) -> Tensor:
    """``weight`` (float8_e4m3fn ``[..., R, C]``) times its blocks' ``scale_inv``, as bf16.

    Works through ``rows_per_chunk`` rows at a time so that the float32 temporaries stay small
    beside the result.
    """
    b0, b1 = block
    rows, cols = weight.shape[-2:]
    scale = scale_inv.float().repeat_interleave(b1, dim=-1)[..., :cols]  # [..., R/b0, C]
    out = torch.empty(weight.shape, dtype=OUTPUT_DTYPE)
    step = max(b0, rows_per_chunk // b0 * b0)  # whole blocks per chunk
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        chunk_scale = scale[..., r0 // b0 : math.ceil(r1 / b0), :].repeat_interleave(b0, dim=-2)[..., : r1 - r0, :]
        out[..., r0:r1, :] = (weight[..., r0:r1, :].float() * chunk_scale).to(OUTPUT_DTYPE)
    return out


def dequantize_mxfp4(blocks: Tensor, scales: Tensor) -> Tensor:
    """``blocks`` (uint8 ``[..., G, 16]``) with ``scales`` (uint8 ``[..., G]``) as bf16 ``[..., G * 32]``;
    a 3-d result is transposed on its last two dims (GPT-OSS's expert layout, as transformers loads it)."""
    table = torch.tensor(_E2M1, dtype=torch.float32)
    *lead, groups, width = blocks.shape
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(*lead, groups, 2 * width)
    exponent = scales.to(torch.int32) - 127
    values = torch.ldexp(table[codes.long()], exponent.unsqueeze(-1))
    out = values.reshape(*lead, groups * 2 * width).to(OUTPUT_DTYPE)
    return out.transpose(-2, -1).contiguous() if out.dim() == 3 else out


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dequantized shape of ``_blocks`` of ``blocks_shape`` (see :func:`dequantize_mxfp4`)."""
    *lead, groups, width = blocks_shape
    shape = (*lead, groups * 2 * width)
    return (shape[0], shape[2], shape[1]) if len(shape) == 3 else shape
