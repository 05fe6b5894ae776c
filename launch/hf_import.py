"""``import-hf``: a Hugging Face model directory (or a dense Llama/Qwen3 one, upcycled) as a
topology-free checkpoint, streamed one tensor (or one expert: its gate, up and down) at a time.

The checkpoint's files are planned from the model's config (:func:`import_plan`), each assembled
from the HF tensors it is made of and written through a resumable staging directory
(:mod:`moe_parallel.checkpoints.resumable`); see :mod:`launch.hf_convert` for the guarantees.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from launch.hf_identity import (
    HF_MODEL_DIR,
    QUANTIZED_SOURCE_FILE,
    ConversionError,
    buffer_names,
    config_dtype,
    expert_parameters,
    meta_decoder,
    require_disk_space,
    require_new_or_empty,
    small_files_bytes,
    space_margin,
    stored_dtype,
    write_hf_model_dir,
)
from moe_parallel import hf
from moe_parallel.checkpoints import resumable
from moe_parallel.checkpoints.checkpoint import BUFFERS_FILE, CheckpointWriter, dense_file, expert_file
from moe_parallel.checkpoints.store import FORMAT_VERSION, clear_dead_staging, signing_key, write_latest, write_manifest
from moe_parallel.hf.families import family
from moe_parallel.hf.load import TensorSource, check_mtp_copies, check_source, nbytes, read_hf_tensors
from moe_parallel.hf.upcycle import UpcycledSource
from moe_parallel.hf.weights import TensorMap, assemble, tensor_map
from moe_parallel.models.decoder import DecoderConfig


def files_fingerprint(folder: Path, names: list[str]) -> dict[str, list[int]]:
    """{name: [bytes, mtime in ns]} of the files that make an input: a changed input is another command."""
    out = {}
    for name in sorted(names):
        stat = (folder / name).stat()
        out[name] = [stat.st_size, stat.st_mtime_ns]
    return out


def _own_storage(tensor: Tensor) -> Tensor:
    """``tensor`` alone in its storage (``torch.save`` writes a view's whole storage)."""
    if tensor.untyped_storage().nbytes() != tensor.nbytes or not tensor.is_contiguous():
        return tensor.contiguous().clone()
    return tensor


@dataclass(frozen=True)
class Piece:
    """One tensor of the checkpoint: made of ``tmap``'s HF tensors, ``shape`` once assembled, stored as ``dtype``.
    ``row``: an expert's slice of a stacked parameter (the row of a one-expert ``tmap``)."""

    tmap: TensorMap
    shape: tuple[int, ...]
    dtype: torch.dtype
    row: bool = False

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


@dataclass(frozen=True)
class CheckpointFile:
    """One file of the imported checkpoint and the tensors it holds (``pieces`` by name or by "w1"/"w2")."""

    rel: str
    kind: str  # "dense", "expert" or "buffers"
    pieces: dict[str, Piece]
    layer: int | None = None
    expert_id: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces.values()) + CHECKPOINT_FILE_OVERHEAD


CHECKPOINT_FILE_OVERHEAD = 4096  # torch.save's zip records and pickle beside a file's tensors


def import_plan(config: DecoderConfig, source: TensorSource, asked: torch.dtype | None) -> list[CheckpointFile]:
    """The files of the checkpoint of ``config``, in write order: the dense tensors one per file, then
    each expert of each MoE layer, then the buffers; each with its HF keys, shape and stored dtype."""
    fam = family(config.hf_model_type)
    model = meta_decoder(config)
    stacked = {
        c: (int(layer), short) for layer, names in expert_parameters(model).items() for short, c in names.items()
    }
    buffers = set(buffer_names(model))

    def piece(canonical: str, ids: range | None, shape: tuple[int, ...], row: bool = False) -> Piece:
        tmap = tensor_map(canonical, fam, ids)
        if tmap is None:
            raise ConversionError(f"tensor {canonical} has no counterpart in a {fam.model_type} checkpoint")
        return Piece(tmap, shape, stored_dtype(tmap.hf_keys, fam, source.torch_dtype(tmap.hf_keys[0]), asked), row)

    dense, experts, buffer_pieces = [], {}, {}
    for canonical, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if canonical in stacked:
            layer, short = stacked[canonical]
            for e in range(shape[0]):
                experts.setdefault((layer, e), {})[short] = piece(canonical, range(e, e + 1), shape[1:], row=True)
        elif canonical in buffers:
            buffer_pieces[canonical] = piece(canonical, None, shape)
        else:
            dense.append(CheckpointFile(dense_file(canonical), "dense", {canonical: piece(canonical, None, shape)}))
    plan = dense + [
        CheckpointFile(expert_file(layer, e), "expert", pieces, layer, e) for (layer, e), pieces in experts.items()
    ]
    return plan + [CheckpointFile(BUFFERS_FILE, "buffers", buffer_pieces)]


def read_piece(source: TensorSource, piece: Piece) -> Tensor:
    """Read and assemble one tensor from ``source``, checked against its shape, in its stored dtype."""
    value = assemble(piece.tmap, read_hf_tensors(source, piece.tmap))  # a fused tensor: only this expert's rows
    if piece.row:
        value = value[0]
    if tuple(value.shape) != piece.shape:
        raise ConversionError(
            f"{source.path}: {piece.tmap.canonical} assembles to {list(value.shape)}, not {list(piece.shape)}"
        )
    return _own_storage(value.to(piece.dtype))


def write_checkpoint_file(writer: CheckpointWriter, source: TensorSource, item: CheckpointFile) -> None:
    """Read the tensors of one file of the plan and write it; they are dropped when this returns."""
    tensors = {name: read_piece(source, piece) for name, piece in item.pieces.items()}
    if item.kind == "expert":
        writer.expert(item.layer, item.expert_id, tensors)
    elif item.kind == "buffers":
        writer.buffers(tensors)
    else:
        ((name, tensor),) = tensors.items()
        writer.dense(name, tensor)


class ReopenedSource:
    """A :class:`TensorSource` opened again after every ``window`` bytes read.

    safetensors maps its files: each page a read touches stays in this process's resident set while
    the file is open. Opening the source again every ``window`` bytes (about one of its shards)
    unmaps them, so the pages held stay near one shard, not the whole model.
    """

    def __init__(self, open_source: Callable[[], TensorSource], window: int) -> None:
        self._open = open_source
        self._source = open_source()
        self._window = window
        self._read = 0
        self.path = self._source.path
        self.shapes = self._source.shapes

    def keys(self) -> set[str]:
        return self._source.keys()

    def torch_dtype(self, key: str) -> torch.dtype:
        return self._source.torch_dtype(key)

    def get(self, key: str) -> Tensor:
        self._count(nbytes(self.shapes[key], self.torch_dtype(key)))
        return self._source.get(key)

    def get_rows(self, key: str, index: int) -> Tensor:
        """Row ``index`` of a tensor holding all experts of a layer (Llama 4, GPT-OSS)."""
        self._count(nbytes(self.shapes[key][1:], self.torch_dtype(key)))
        return self._source.get_rows(key, index)

    def _count(self, size: int) -> None:
        if self._read and self._read + size > self._window:
            self._source = None  # the old files are unmapped before the new ones open
            self._source = self._open()
            self._read = 0
        self._read += size


READ_WINDOW_MIN = 64 << 20  # sources of tiny shards are not opened again for every few tensors


def read_window(hf_dir: Path) -> int:
    """Bytes read between two openings of a source: its largest file (a shard), at least 64 MiB."""
    return max([READ_WINDOW_MIN, *(p.stat().st_size for p in hf_dir.glob("*.safetensors"))])


def open_import_source(
    hf_dir: Path, upcycle_experts: int | None, top_k: int | None, seed: int
) -> tuple[DecoderConfig, Callable[[], TensorSource]]:
    """The model's config and a function that opens its tensors (a dense model's through upcycling)."""
    if upcycle_experts is not None:
        config = hf.upcycle_config(hf_dir, num_experts=upcycle_experts, top_k=top_k)
        return config, lambda: UpcycledSource(hf.SafetensorsDir(hf_dir), config, seed)
    return hf.load_config(hf_dir), lambda: hf.SafetensorsDir(hf_dir)


def import_hf(
    hf_dir: str | Path,
    out: str | Path,
    *,
    tag: str = "imported",
    upcycle_experts: int | None = None,
    top_k: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    say: Callable[[str], None] = print,
) -> Path:
    """An HF model directory (or, upcycled, a dense Llama/Qwen3 one) as a topology-free checkpoint.

    Writes ``out/<tag>/`` (weights at step 0, loadable at any layout), ``out/latest`` and
    ``out/hf_model/``; returns the checkpoint's directory. Tensors keep the source's dtype (the
    family's float32 tensors stay float32) unless ``dtype`` is given. The checkpoint is written one
    tensor or one expert at a time, resumably (see :mod:`launch.hf_convert`); ``say`` gets the lines a
    user should read (work resumed or discarded).
    """
    hf_dir, out = Path(hf_dir), Path(out)
    if (upcycle_experts is None) != (top_k is None):
        raise ConversionError(
            "--upcycle-experts and --top-k go together: give both to upcycle a dense model, or neither"
        )
    require_new_or_empty(out, "a checkpoint")
    source_dtype = config_dtype(hf_dir)
    config, open_source = open_import_source(hf_dir, upcycle_experts, top_k, seed)
    source = ReopenedSource(open_source, read_window(hf_dir))
    check_source(config, source)  # every key and shape, from the headers, before anything is written
    check_mtp_copies(config, source)  # MTP modules share the main embedding and head
    plan = import_plan(config, source, dtype)
    model = meta_decoder(config)
    inputs = [p.name for p in hf_dir.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file()]
    fingerprint = {
        "command": "import-hf",
        "source": str(hf_dir.resolve()),
        "source files": files_fingerprint(hf_dir, inputs),
        "tag": tag,
        "dtype": str(dtype),
        "upcycle": [upcycle_experts, top_k, seed],
        "signed": signing_key() is not None,
        "format": FORMAT_VERSION,
    }
    clear_dead_staging(out)  # private staging directories whose writer is provably gone
    with resumable.resumable_output(out, fingerprint, say) as staged:
        writer = CheckpointWriter(staged.tree / tag, staged, prefix=f"{tag}/")
        todo = [item for item in plan if not writer.finished(item.rel)]
        needed = sum(item.nbytes for item in todo) + small_files_bytes(hf_dir)
        require_disk_space(out, needed + space_margin(needed), "the checkpoint")
        for item in todo:
            write_checkpoint_file(writer, source, item)
        manifest = writer.finish(expert_parameters(model), buffer_names(model))
        write_manifest(staged.tree / tag, manifest)
        write_latest(staged.tree, tag)
        write_hf_model_dir(config, staged.tree / HF_MODEL_DIR, tokenizer_dir=hf_dir, dtype=source_dtype)
        method = None if upcycle_experts is not None else hf.SafetensorsDir(hf_dir).quantization
        if method is not None:  # export-hf says it writes the dequantized weights
            (staged.tree / HF_MODEL_DIR / QUANTIZED_SOURCE_FILE).write_text(json.dumps({"quantization": method}) + "\n")
    return out / tag
