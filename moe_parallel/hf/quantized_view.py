"""A safetensors checkpoint seen with its quantized tensors dequantized: the logical keys (``X.weight``,
``P``) with their logical shapes and dtype bf16; the scale / blocks tensors are hidden.

Everything is checked from the file headers when the view is built (a scale grid that does not fit
its weight, a weight without its scale, an FP8 kind we do not read), and ``get`` dequantizes the one
tensor asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import Tensor

from .families import HFConversionError
from .quantization import (
    OUTPUT_DTYPE_NAME,
    SUPPORTED,
    Quantization,
    dequantize_fp8,
    dequantize_mxfp4,
    fp8_scale_grid,
    mxfp4_shape,
)

FP8_WEIGHT_DTYPE = "F8_E4M3"
FP8_SCALE = "_scale_inv"
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")
ACTIVATION_SCALES = (".input_scale", ".activation_scale")
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"


class StoredTensors(Protocol):
    """Tensors as stored: by key, their header shape and safetensors dtype, read one at a time."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    def get(self, key: str) -> Tensor: ...
    def get_rows(self, key: str, index: int) -> Tensor: ...


class DequantizedView:
    """``stored`` with FP8 block-scaled and MXFP4 tensors presented dequantized (bf16)."""

    def __init__(self, stored: StoredTensors, quantization: Quantization | None) -> None:
        self.path = stored.path
        self._stored = stored
        self._block = quantization.block if quantization is not None and quantization.method == "fp8" else None
        self._parts: dict[str, tuple[str, str, str]] = {}  # logical key -> (kind, data key, scale key)
        hidden: set[str] = set()
        for key in sorted(stored.shapes):
            dtype = stored.dtypes[key]
            if dtype.startswith("F8_") and not key.endswith(FP8_SCALE):
                hidden.add(self._add_fp8(key))
            elif key.endswith(MX_BLOCKS) and dtype == "U8":
                hidden.update((key, self._add_mxfp4(key)))
        self._refuse_orphans(hidden)
        kinds = sorted({kind for kind, _, _ in self._parts.values()})
        self.quantization: str | None = "+".join(kinds) or (quantization.method if quantization else None)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for key in stored.shapes:
            if key not in hidden:
                self.shapes[key], self.dtypes[key] = stored.shapes[key], stored.dtypes[key]
        for key, (kind, data, _) in self._parts.items():
            shape = stored.shapes[data]
            self.shapes[key] = mxfp4_shape(shape) if kind == "mxfp4" else shape
            self.dtypes[key] = OUTPUT_DTYPE_NAME

    # ---------------------------------------------------------------- header checks

    def _refuse(self, key: str, what: str, problem: str) -> None:
        raise HFConversionError(
            f"{self.path}: {what} tensor {key} {problem}: supported are {SUPPORTED}; "
            "re-download the checkpoint, or dequantize it to bf16 first"
        )

    def _add_fp8(self, key: str) -> str:
        shapes, dtypes = self._stored.shapes, self._stored.dtypes
        if dtypes[key] != FP8_WEIGHT_DTYPE:
            self._refuse(key, "FP8", f"is {dtypes[key]}, not F8_E4M3 (only E4M3 FP8 weights are read)")
        scale = key + FP8_SCALE if not key.endswith(".weight") else key.removesuffix(".weight") + ".weight_scale_inv"
        for suffix in ACTIVATION_SCALES:
            stem = key.removesuffix(".weight") + suffix
            if stem in shapes:
                self._refuse(stem, "FP8", "is a static activation scale (only activation_scheme 'dynamic' is read)")
        if scale not in shapes:
            self._refuse(key, "FP8", f"has no {scale} beside it (FP8 weights without block scales are not read)")
        if len(shapes[key]) < 2:
            self._refuse(key, "FP8", f"has shape {list(shapes[key])}: block-scaled FP8 weights have >= 2 dims")
        if dtypes[scale] not in SCALE_DTYPES:
            self._refuse(scale, "FP8 scale", f"is {dtypes[scale]}, not one of {list(SCALE_DTYPES)}")
        if self._block is None:
            self._refuse(
                key, "FP8", "is FP8 but config.json has no quantization_config with quant_method 'fp8' (its block size)"
            )
        grid = fp8_scale_grid(shapes[key], self._block)
        if tuple(shapes[scale]) != grid:
            per_tensor = len(shapes[scale]) < 2 or all(n == 1 for n in shapes[scale])
            kind = "a per-tensor scale" if per_tensor and grid != tuple(shapes[scale]) else "a scale grid"
            self._refuse(
                scale,
                "FP8 scale",
                f"has shape {list(shapes[scale])} ({kind}), but {key} {list(shapes[key])} in blocks of "
                f"{list(self._block)} (config.json quantization_config.weight_block_size) needs {list(grid)}",
            )
        self._parts[key] = ("fp8", key, scale)
        return scale

    def _add_mxfp4(self, key: str) -> str:
        shapes, dtypes = self._stored.shapes, self._stored.dtypes
        logical = key.removesuffix(MX_BLOCKS)
        scales = logical + MX_SCALES
        if scales not in shapes:
            self._refuse(key, "MXFP4", f"has no {scales} beside it")
        if dtypes[scales] != "U8":
            self._refuse(scales, "MXFP4", f"is {dtypes[scales]}, not U8 (E8M0 exponents)")
        if len(shapes[key]) < 2 or shapes[key][-1] != 16:
            self._refuse(key, "MXFP4", f"has shape {list(shapes[key])}: MXFP4 blocks are [..., groups, 16] bytes")
        if tuple(shapes[scales]) != tuple(shapes[key][:-1]):
            self._refuse(scales, "MXFP4", f"has shape {list(shapes[scales])}, {key} needs {list(shapes[key][:-1])}")
        if logical in shapes:
            self._refuse(logical, "MXFP4", f"is stored beside its quantized form {key}")
        self._parts[logical] = ("mxfp4", key, scales)
        return scales

    def _refuse_orphans(self, hidden: set[str]) -> None:
        for key, dtype in self._stored.dtypes.items():
            if key in hidden:
                continue
            if key.endswith(FP8_SCALE):
                self._refuse(key, "FP8 scale", "has no F8_E4M3 weight beside it")
            if key.endswith(MX_SCALES) and dtype == "U8":
                self._refuse(key, "MXFP4", f"has no {key.removesuffix(MX_SCALES)}{MX_BLOCKS} beside it")

    # ---------------------------------------------------------------- reading

    def get(self, key: str) -> Tensor:
        if key not in self._parts:
            return self._stored.get(key)
        kind, data, scale = self._parts[key]
        return self._decode(kind, self._stored.get(data), self._stored.get(scale))

    def get_rows(self, key: str, index: int) -> Tensor:
        """``get(key)[index]``, reading only that slice where the stored layout allows (experts)."""
        if key not in self._parts:
            return self._stored.get_rows(key, index)
        kind, data, scale = self._parts[key]
        if len(self._stored.shapes[data]) < (3 if kind == "fp8" else 4):
            return self.get(key)[index]
        part = self._decode(kind, self._stored.get_rows(data, index), self._stored.get_rows(scale, index))
        return part.transpose(-2, -1).contiguous() if kind == "mxfp4" and part.dim() == 2 else part

    def _decode(self, kind: str, data: Tensor, scale: Tensor) -> Tensor:
        if kind == "fp8":
            return dequantize_fp8(data, scale, self._block)
        return dequantize_mxfp4(data, scale)
