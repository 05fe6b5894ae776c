"""transformers 5's fused expert layout seen through the per-expert keys the weight mapping reads.

``save_pretrained(..., save_original_format=False)`` stores each MoE layer's routed experts as two
tensors, ``model.layers.i.mlp.experts.gate_up_proj`` ``[E, 2F, D]`` (gate rows, then up rows) and
``down_proj`` ``[E, D, F]``, and the router under ``mlp`` even where the Hub layout names the block
otherwise (Mixtral's ``block_sparse_moe``). The view presents ``experts.<j>.<gate|up|down>.weight``
(``[F, D]``, ``[F, D]``, ``[D, F]``) sliced from them, reading only expert ``j``'s rows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from torch import Tensor

from .families import Family, HFConversionError

# Families whose Hub layout is per-expert and which transformers 5 can save fused. A family whose own
# layout is fused (GPT-OSS, Llama 4) maps its tensors itself and is not listed.
FUSED_LAYOUT_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe", "deepseek_v3", "deepseek_v2")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.\w+\.experts\.\d+\..+")
SAVE_ORIGINAL = "save it with transformers' save_pretrained(..., save_original_format=True)"


class Tensors(Protocol):
    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    def get(self, key: str) -> Tensor: ...
    def get_rows(self, key: str, index: int) -> Tensor: ...


def fused_expert_keys(keys) -> list[str]:
    """The keys of ``keys`` in transformers' fused expert layout."""
    return sorted(k for k in keys if _FUSED.fullmatch(k))


def fused_layout_message(path: Path, model_type: str | None, keys: list[str]) -> str:
    """Why a fused-layout checkpoint of ``model_type`` is not read, and the fix."""
    return (
        f"{path}: {keys[:2]} are transformers' fused expert layout (save_original_format=False), which is not "
        f"read for model_type={model_type!r} (it is for {list(FUSED_LAYOUT_FAMILIES)}): {SAVE_ORIGINAL}"
    )


class FusedExpertsView:
    """``tensors`` with each fused expert pair presented as per-expert keys of ``family``."""

    def __init__(self, tensors: Tensors, family: Family) -> None:
        self.path = tensors.path
        self._tensors = tensors
        self._from: dict[str, tuple[str, int, slice | None]] = {}  # per-expert key -> (fused key, expert, rows)
        self._renamed: dict[str, str] = {}
        self._cached: tuple[str, int, Tensor] | None = None
        shapes, dtypes = tensors.shapes, tensors.dtypes
        fused = fused_expert_keys(shapes)
        layers = sorted({int(_FUSED.fullmatch(k).group(1)) for k in fused})
        mixed = [k for k in shapes if (m := _PER_EXPERT.fullmatch(k)) and int(m.group(1)) in layers]
        if mixed:
            self._refuse(fused, f"{mixed[0]} is stored per expert in the same layer")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        gate, up, down = family.expert_proj
        for layer in layers:
            gate_up_key = f"model.layers.{layer}.mlp.experts.gate_up_proj"
            down_key = f"model.layers.{layer}.mlp.experts.down_proj"
            if gate_up_key not in shapes or down_key not in shapes:
                self._refuse(fused, f"layer {layer} holds only one of gate_up_proj / down_proj")
            gu, dn = shapes[gate_up_key], shapes[down_key]
            if len(gu) != 3 or len(dn) != 3 or gu[1] % 2 or (gu[0], gu[2], gu[1] // 2) != (dn[0], dn[1], dn[2]):
                shapes_now = f"gate_up_proj {list(gu)} and down_proj {list(dn)}"
                self._refuse(fused, f"layer {layer}'s {shapes_now} are not [E, 2F, D], [E, D, F]")
            num_experts, width, hidden = gu[0], gu[1] // 2, gu[2]
            prefix = f"model.layers.{layer}.{family.moe_module}.experts"
            for j in range(num_experts):
                for name, source, rows, shape in (
                    (gate, gate_up_key, slice(0, width), (width, hidden)),
                    (up, gate_up_key, slice(width, 2 * width), (width, hidden)),
                    (down, down_key, None, (hidden, width)),
                ):
                    key = f"{prefix}.{j}.{name}.weight"
                    self._from[key] = (source, j, rows)
                    self.shapes[key], self.dtypes[key] = shape, dtypes[source]
        moe_prefixes = {f"model.layers.{layer}.mlp.": f"model.layers.{layer}.{family.moe_module}." for layer in layers}
        for key, shape in shapes.items():
            if key in fused:
                continue
            name = key
            head = ".".join(key.split(".")[:4]) + "."
            if head in moe_prefixes and family.moe_module != "mlp":
                name = moe_prefixes[head] + key[len(head) :]  # the router of a renamed MoE block
                self._renamed[name] = key
            self.shapes[name], self.dtypes[name] = shape, dtypes[key]

    def _refuse(self, fused: list[str], why: str) -> None:
        raise HFConversionError(
            f"{self.path}: {fused[:2]} are transformers' fused expert layout, which cannot be mapped here ({why}): "
            + SAVE_ORIGINAL
        )

    def get(self, key: str) -> Tensor:
        if key not in self._from:
            return self._tensors.get(self._renamed.get(key, key))
        source, expert, rows = self._from[key]
        if self._cached is None or self._cached[:2] != (source, expert):
            self._cached = (source, expert, self._tensors.get_rows(source, expert))  # gate and up share a read
        value = self._cached[2]
        return (value if rows is None else value[rows]).contiguous()

    def get_rows(self, key: str, index: int) -> Tensor:
        if key in self._from:
            return self.get(key)[index]
        return self._tensors.get_rows(self._renamed.get(key, key), index)
