"""Reading and writing Hub-layout safetensors directories (single file, or shards with an index).

The reader knows every key's shard, shape and dtype from the file headers alone, so a checkpoint is
checked completely before any tensor is read, and each rank then reads only the tensors it holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .families import HFConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


class SafetensorsDir:
    """The tensors of a Hugging Face model directory, by key, opened lazily per shard."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

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
        self._handles = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.file_of: dict[str, str] = {}
        for file in files:
            try:
                handle = safe_open(str(self.path / file), framework="pt")
                self._handles[file] = handle
                for key in handle.keys():
                    tensor_slice = handle.get_slice(key)
                    self.shapes[key] = tuple(tensor_slice.get_shape())
                    self.dtypes[key] = tensor_slice.get_dtype()
                    self.file_of[key] = file
            except Exception as err:  # safetensors' own error types: a truncated or damaged header
                raise _damaged(self.path / file, err) from None
        if weight_map is not None:
            wrong = [k for k, f in weight_map.items() if self.file_of.get(k) != f]
            if wrong:
                raise HFConversionError(
                    f"{self.path}: {INDEX_FILE} places {wrong[:3]} in shards that do not hold them: "
                    "the index and the shards are from different saves"
                )

    def keys(self) -> set[str]:
        return set(self.shapes)

    def get(self, key: str) -> Tensor:
        file = self.file_of[key]
        try:
            return self._handles[file].get_tensor(key)
        except Exception as err:  # data that the header promises but the file does not hold
            raise _damaged(self.path / file, err) from None

    def get_rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` (dim 0) of a tensor, reading only those bytes."""
        file = self.file_of[key]
        try:
            return self._handles[file].get_slice(key)[start:stop]
        except Exception as err:
            raise _damaged(self.path / file, err) from None

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
