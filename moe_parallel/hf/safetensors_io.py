"""Reading and writing Hub-layout safetensors directories (single file, or shards with an index).

The reader knows every key's shard, shape and dtype from the file headers alone, so a checkpoint is
checked completely before any tensor is read, and each rank then reads only the tensors it holds.
:class:`SafetensorsDir` is the checkpoint as the loader sees it: quantized tensors dequantized
(``quantized_view``), transformers' fused expert layout as per-expert keys (``fused_experts``), a tied
embedding stored as ``lm_head.weight`` under the embedding's key (``tied_embeddings``).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from torch import Tensor

from .families import FAMILIES, TEXT_TOWERS, HFConversionError, read_config_json
from .fused_experts import FUSED_LAYOUT_FAMILIES, FusedExpertsView, fused_expert_keys
from .quantization import check_quantization
from .quantized_view import DequantizedView
from .tied_embeddings import HeadAsEmbedding, head_only

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
# Every safetensors dtype torch can hold, for reading the bytes.
_STORED_DTYPES = {
    **_DTYPES,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}


class SafetensorFiles:
    """The tensors of a Hugging Face model directory as stored, by key: shard, shape, dtype, bytes.

    Data is read with plain file reads, not a memory map, so a file that is cut short or fails to
    read after its header was checked raises :class:`HFConversionError` naming it (a mapped read of
    missing bytes would kill the process with SIGBUS).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise TypeError(f"weight_map is {type(weight_map).__name__}, not a map of file names")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise HFConversionError(
                    f"{index} is not a safetensors index ({err}): re-download or re-save it"
                ) from err
        elif (self.path / SINGLE_FILE).is_file():
            weight_map = None
        else:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            hint = (
                f" (found {bins[:3]}: convert them with transformers' save_pretrained(safe_serialization=True))"
                if bins
                else ""
            )
            raise HFConversionError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            keys = [k for k, f in (weight_map or {}).items() if f == missing[0]][:3]
            raise HFConversionError(
                f"{self.path}: shard(s) {missing} listed in {INDEX_FILE} are missing (they hold e.g. {keys}): "
                "copy every shard of the checkpoint into the directory"
            )
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.file_of: dict[str, str] = {}
        self._offsets: dict[str, int] = {}  # absolute byte offset of each tensor's data in its file
        for file in files:
            self._scan(file)
        if weight_map is not None:
            wrong = [k for k, f in weight_map.items() if self.file_of.get(k) != f]
            if wrong:
                raise HFConversionError(
                    f"{self.path}: {INDEX_FILE} places {wrong[:3]} in shards that do not hold them: "
                    "the index and the shards are from different saves"
                )

    def _scan(self, file: str) -> None:
        """Check ``file``'s header with safetensors' own validation, then record its tensors."""
        from safetensors import safe_open

        full = self.path / file
        try:
            with safe_open(str(full), framework="pt"):  # header length, JSON, offsets covering the whole file
                pass
            with open(full, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except Exception as err:  # safetensors' own error types: a truncated or damaged header
            raise _damaged(full, err) from None
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            self.shapes[key] = tuple(entry["shape"])
            self.dtypes[key] = entry["dtype"]
            self.file_of[key] = file
            self._offsets[key] = 8 + length + entry["data_offsets"][0]

    def keys(self) -> set[str]:
        return set(self.shapes)

    def get(self, key: str) -> Tensor:
        return self._read(key, 0, self.shapes[key])

    def get_rows(self, key: str, index: int) -> Tensor:
        """``get(key)[index]`` for an index into the first dim, reading only those bytes."""
        shape = self.shapes[key]
        if not 0 <= index < shape[0]:
            raise IndexError(f"{key}: row {index} of {shape[0]}")
        return self._read(key, index * math.prod(shape[1:]), shape[1:])

    def _read(self, key: str, first: int, shape: tuple[int, ...]) -> Tensor:
        dtype = _STORED_DTYPES.get(self.dtypes[key])
        if dtype is None:
            raise HFConversionError(
                f"{self.path}: tensor {key} has dtype {self.dtypes[key]}, which torch cannot hold: "
                "only float tensors (and the quantized formats of moe_parallel.hf.quantization) are read"
            )
        size = torch.empty((), dtype=dtype).element_size()
        count = math.prod(shape)
        file = self.path / self.file_of[key]
        try:
            with open(file, "rb") as f:
                f.seek(self._offsets[key] + first * size)
                data = bytearray(count * size)
                got = f.readinto(data)
        except OSError as err:
            raise _damaged(file, err) from None
        if got != len(data):
            raise _damaged(file, EOFError(f"{key} needs {len(data)} bytes, the file holds {got} of them"))
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)


class TextTowerView:
    """The tensors under ``prefix`` (a multimodal checkpoint's text tower) under the names of the
    text-only model; the other towers' tensors are not listed."""

    def __init__(self, tensors, prefix: str) -> None:
        self.path = tensors.path
        self._tensors, self._prefix = tensors, prefix
        names = {key[len(prefix) :]: key for key in tensors.shapes if key.startswith(prefix)}
        self.shapes = {name: tensors.shapes[key] for name, key in names.items()}
        self.dtypes = {name: tensors.dtypes[key] for name, key in names.items()}

    def get(self, key: str) -> Tensor:
        return self._tensors.get(self._prefix + key)

    def get_rows(self, key: str, index: int) -> Tensor:
        return self._tensors.get_rows(self._prefix + key, index)


class SafetensorsDir:
    """The tensors of a Hugging Face model directory, by key, as the loader reads them.

    Opens the shards' headers (:class:`SafetensorFiles`) and config.json (when present: its
    ``quantization_config``, ``model_type`` and ``tie_word_embeddings``), then presents:
    quantized tensors dequantized to bf16 under their logical keys; transformers' fused expert layout
    as per-expert keys (families of :data:`FUSED_LAYOUT_FAMILIES`); a tied embedding stored only as
    ``lm_head.weight`` also under ``model.embed_tokens.weight``. ``quantization`` names the stored
    format ("fp8", "mxfp4") or is None; ``fused_experts`` tells whether the fused layout was read.
    """

    def __init__(self, path: str | Path) -> None:
        stored = SafetensorFiles(path)
        self.path = stored.path
        raw = read_config_json(self.path) if (self.path / "config.json").is_file() else {}
        view = DequantizedView(stored, check_quantization(raw, self.path))
        self.quantization: str | None = view.quantization
        fam = FAMILIES.get(raw.get("model_type"))
        self.fused_experts = (
            fam is not None and fam.model_type in FUSED_LAYOUT_FAMILIES and bool(fused_expert_keys(view.shapes))
        )
        if self.fused_experts:
            view = FusedExpertsView(view, fam)
        if raw.get("model_type") in TEXT_TOWERS:
            view = TextTowerView(view, TEXT_TOWERS[raw["model_type"]][1])
            raw = raw.get("text_config") or {}
        if head_only(view.shapes, raw.get("tie_word_embeddings") is True):
            view = HeadAsEmbedding(view)
        self._view = view
        self.shapes: dict[str, tuple[int, ...]] = view.shapes
        self.dtypes: dict[str, str] = view.dtypes

    def keys(self) -> set[str]:
        return set(self.shapes)

    def get(self, key: str) -> Tensor:
        return self._view.get(key)

    def get_rows(self, key: str, index: int) -> Tensor:
        return self._view.get_rows(key, index)

    def torch_dtype(self, key: str) -> torch.dtype:
        if self.dtypes[key] not in _DTYPES:
            raise HFConversionError(
                f"{self.path}: tensor {key} has dtype {self.dtypes[key]}; only float tensors are supported"
            )
        return _DTYPES[self.dtypes[key]]


def _damaged(file: Path, err: Exception) -> HFConversionError:
    return HFConversionError(
        f"{file} cannot be read as safetensors ({type(err).__name__}: {err}): it is truncated or damaged; "
        "copy or download it again"
    )


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def plan_shards(sizes: list[tuple[str, int, int]], max_shard_bytes: int) -> dict[str, str]:
    """HF key -> file, for ``(key, owner, bytes)`` in write order.

    Each owner (a rank that holds the tensors) fills its own shards, so ranks write without
    gathering; a shard closes once adding a tensor would pass ``max_shard_bytes``. One shard in all
    is written as ``model.safetensors`` without an index, as transformers does.
    """
    groups: list[list[str]] = []
    for owner in sorted({o for _, o, _ in sizes}):
        current: list[str] = []
        filled = 0
        for key, o, nbytes in sizes:
            if o != owner:
                continue
            if current and filled + nbytes > max_shard_bytes:
                groups.append(current)
                current, filled = [], 0
            current.append(key)
            filled += nbytes
        if current:
            groups.append(current)
    if len(groups) == 1:
        return dict.fromkeys(groups[0], SINGLE_FILE)
    return {key: shard_name(i, len(groups)) for i, keys in enumerate(groups) for key in keys}


def write_index(path: Path, file_of: dict[str, str], total_bytes: int) -> None:
    if set(file_of.values()) == {SINGLE_FILE}:
        return
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(file_of.items()))}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_shards(path: Path, tensors: dict[str, Tensor], file_of: dict[str, str]) -> None:
    """Write ``tensors`` (this rank's) into their planned files; a file is written whole or not at all."""
    from safetensors.torch import save_file

    by_file: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        by_file.setdefault(file_of[key], {})[key] = tensor.detach().cpu().contiguous()
    for file, content in by_file.items():
        tmp = path / f".{file}.tmp"
        save_file(content, str(tmp), metadata={"format": "pt"})
        tmp.replace(path / file)
