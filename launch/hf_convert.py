"""Hugging Face directory <-> topology-free checkpoint, offline, in one process (``checkpoint_tool``'s
``import-hf`` / ``export-hf``).

A converted or trained checkpoint directory holds, beside ``latest`` and its tags, ``hf_model/``:
the model's identity as a Hugging Face config (config.json of its family and the tokenizer files).
Checkpoints hold the persistent buffers too (GLM's correction bias, trained or not), so an export
carries the bias of the step it exports; ``buffers.safetensors`` is only read, for checkpoints
saved before checkpoints held buffers. Training a ``model=hf`` run writes the same folder into its
``checkpoints/``, so ``export-hf`` works from any run's checkpoint, saved at any (PP, EP, DP): the
checkpoint's tensors are full values under global expert ids, and the export only renames and
splits them.

    import-hf HF_DIR --out CKPT_DIR                       # HF -> checkpoint (weights, step 0)
    import-hf DENSE_DIR --out CKPT_DIR --upcycle-experts 8 --top-k 2   # a dense Llama/Qwen3, upcycled
    export-hf CKPT_DIR --out HF_DIR [--dtype bf16]        # checkpoint -> HF (config, shards, tokenizer)

Both stream: the import reads one tensor (or one expert: its gate, up and down) at a time, assembles
it and writes its file; the export gathers one safetensors shard at a time from the checkpoint files
it needs. Memory holds about one shard plus one tensor, whatever the model's size. Tensors keep the
source's dtype unless ``--dtype`` asks for another (the family's float32 tensors stay float32).

Both write under a fixed staging directory beside ``--out`` (``.<name>.tmp-resume/``, see
:mod:`moe_parallel.checkpoints.resumable`) and rename it into place at the end, so ``--out`` holds a
complete result or nothing. A killed conversion leaves its finished files there with a journal: the
same command again checks them (size and CRC-32) and continues; another command on the same
``--out`` discards them and says so; a conversion still running is refused. The disk space the
output needs (from the headers, less what a resumed run has) is checked before anything is written.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moe_parallel import hf
from moe_parallel.checkpoints import resumable
from moe_parallel.checkpoints.checkpoint import (
    BUFFERS_FILE,
    CheckpointError,
    CheckpointWriter,
    ConsolidatedReader,
    dense_file,
    expert_file,
    resolve_checkpoint,
)
from moe_parallel.checkpoints.store import (
    FORMAT_VERSION,
    clear_dead_staging,
    file_checksum,
    file_entry,
    signing_key,
    write_latest,
    write_manifest,
)
from moe_parallel.core.layer import MoELayer
from moe_parallel.hf.families import Family, family, read_config_json
from moe_parallel.hf.load import TensorSource, check_mtp_copies, check_source, expected_keys, nbytes, read_hf_tensors
from moe_parallel.hf.safetensors_io import plan_shards, write_index, write_shards
from moe_parallel.hf.save import DEFAULT_MAX_SHARD_BYTES, TOKENIZER_FILES
from moe_parallel.hf.upcycle import UpcycledSource
from moe_parallel.hf.weights import TensorMap, assemble, disassemble, tensor_map
from moe_parallel.models.decoder import Decoder, DecoderConfig

HF_MODEL_DIR = "hf_model"  # beside `latest` in a checkpoint directory
QUANTIZED_SOURCE_FILE = "quantized_source.json"  # in hf_model/: the imported weights were dequantized
BUFFERS_FILE_OF_OLDER_RUNS = "buffers.safetensors"  # written by earlier versions: buffers of checkpoints without them
TRAINING_FILE = "moe_parallel.json"  # how the run trained (refuses exporting an older checkpoint's lost bias)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(ValueError):
    """A conversion cannot run; the message names the argument or file and the fix."""


# ---------------------------------------------------------------- the model's HF identity


def meta_decoder(config: DecoderConfig) -> Decoder:
    """The plain model of ``config`` without memory: its names, shapes and MoE layers."""
    with torch.device("meta"):
        return Decoder(config)


def expert_parameters(model: Decoder) -> dict[str, dict[str, str]]:
    """{layer number: {"w1": canonical name, ...}}: the stacked expert parameters, as manifests list them."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, MoELayer):
            out[str(module.layer_number)] = {
                short: f"{prefix}.experts.{short}" for short, _ in module.experts.named_parameters()
            }
    return out


def buffer_names(model: Decoder) -> list[str]:
    """Persistent buffers (in the state dict, not parameters), e.g. GLM's correction bias."""
    params = {name for name, _ in model.named_parameters()}
    return [name for name in model.state_dict(keep_vars=True) if name not in params]


def write_hf_model_dir(
    config: DecoderConfig,
    dest: str | Path,
    *,
    tokenizer_dir: str | Path | None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the model's HF identity (config.json of its family, tokenizer files) to ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    hf.hf_config_from_decoder(config, dtype).save_pretrained(str(dest))
    hf.copy_tokenizer_files(tokenizer_dir, dest)
    return dest


def config_dtype(hf_dir: Path) -> torch.dtype:
    """The dtype config.json declares (``dtype`` / ``torch_dtype``); fp32 when absent."""
    raw = read_config_json(hf_dir)
    value = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), None)
    return value if isinstance(value, torch.dtype) else torch.float32


# ---------------------------------------------------------------- what both directions share


def stored_dtype(keys: list[str], fam: Family, source_dtype: torch.dtype, asked: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: float32 for what the family keeps in float32 (GLM's router and
    correction bias), else the one asked, else the source's."""
    if keys and all(fam.keeps_fp32(key) for key in keys):
        return torch.float32
    return asked or source_dtype


def require_disk_space(out: Path, needed: int, what: str) -> None:
    """Refuse, before anything is written, an output that does not fit on ``out``'s file system."""
    free = resumable.free_bytes(out.parent)
    if needed > free:
        raise ConversionError(
            f"--out {out}: {what} needs {needed:,} more bytes ({needed / 2**30:.2f} GiB, with a margin) on its file "
            f"system, which has {free:,} bytes ({free / 2**30:.2f} GiB) free: free space there, or choose an --out "
            "on another file system"
        )


def _margin(total: int) -> int:
    """Room beyond the estimate: file-system blocks and metadata, the files' own headers."""
    return max(total // 100, 16 << 20)


def _files_fingerprint(folder: Path, names: list[str]) -> dict[str, list[int]]:
    """{name: [bytes, mtime in ns]} of the files that make an input: a changed input is another command."""
    out = {}
    for name in sorted(names):
        stat = (folder / name).stat()
        out[name] = [stat.st_size, stat.st_mtime_ns]
    return out


def _small_files_bytes(folder: Path | None) -> int:
    """Bytes of the config and tokenizer files an output copies (a fraction of a model, but counted)."""
    if folder is None:
        return 0
    return sum(
        (folder / name).stat().st_size for name in (*TOKENIZER_FILES, "config.json") if (folder / name).is_file()
    )


def _own_storage(tensor: Tensor) -> Tensor:
    """``tensor`` alone in its storage (``torch.save`` writes a view's whole storage)."""
    if tensor.untyped_storage().nbytes() != tensor.nbytes or not tensor.is_contiguous():
        return tensor.contiguous().clone()
    return tensor


# ---------------------------------------------------------------- import-hf


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
    tensor or one expert at a time, resumably (see the module's docstring); ``say`` gets the lines a
    user should read (work resumed or discarded).
    """
    hf_dir, out = Path(hf_dir), Path(out)
    if (upcycle_experts is None) != (top_k is None):
        raise ConversionError(
            "--upcycle-experts and --top-k go together: give both to upcycle a dense model, or neither"
        )
    _require_new_or_empty(out, "a checkpoint")
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
        "source files": _files_fingerprint(hf_dir, inputs),
        "tag": tag,
        "dtype": str(dtype),
        "upcycle": [upcycle_experts, top_k, seed],
        "signed": signing_key() is not None,
        "format": FORMAT_VERSION,
    }
    clear_dead_staging(out)  # what conversions of earlier versions left
    with resumable.resumable_output(out, fingerprint, say) as staged:
        writer = CheckpointWriter(staged.tree / tag, staged, prefix=f"{tag}/")
        todo = [item for item in plan if not writer.finished(item.rel)]
        needed = sum(item.nbytes for item in todo) + _small_files_bytes(hf_dir)
        require_disk_space(out, needed + _margin(needed), "the checkpoint")
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


def _require_new_or_empty(out: Path, what: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        held = sorted(p.name for p in out.iterdir())[:4] if out.is_dir() else "a file"
        raise ConversionError(f"--out {out} already holds {held}: choose a new or empty directory for {what}")


# ---------------------------------------------------------------- export-hf


def find_hf_model_dir(checkpoint: Path, root: Path) -> Path | None:
    """``hf_model/`` beside ``latest`` (the directory given, or the parent of a tag directory)."""
    for folder in (root, checkpoint.parent, checkpoint):
        if (folder / HF_MODEL_DIR / "config.json").is_file():
            return folder / HF_MODEL_DIR
    return None


@dataclass(frozen=True)
class Origin:
    """Where one HF tensor comes from: a dense tensor or buffer (``expert_id`` None), or one expert's
    row of a stacked parameter (``short`` "w1"/"w2" of MoE layer ``layer``)."""

    canonical: str
    expert_id: int | None = None
    layer: int | None = None
    short: str = ""
    all_experts: bool = False  # every expert's row of the layer (a family that stores them in one tensor)


def hf_origins(config: DecoderConfig, reader: ConsolidatedReader) -> dict[str, tuple[Origin, TensorMap]]:
    """HF key -> (its origin in the checkpoint, the map that splits that origin into HF keys)."""
    fam = family(config.hf_model_type)
    stacked = {
        c: (int(layer), short) for layer, names in reader.expert_parameters.items() for short, c in names.items()
    }
    out = {}
    for canonical, tensor in meta_decoder(config).state_dict().items():
        if canonical in stacked and fam.fused_experts:
            layer, short = stacked[canonical]
            units = [(Origin(canonical, None, layer, short, all_experts=True), range(tensor.shape[0]))]
        elif canonical in stacked:
            layer, short = stacked[canonical]
            units = [(Origin(canonical, e, layer, short), range(e, e + 1)) for e in range(tensor.shape[0])]
        else:
            units = [(Origin(canonical), None)]
        for origin, ids in units:
            tmap = tensor_map(canonical, fam, ids)
            for key in tmap.hf_keys:
                out[key] = (origin, tmap)
    return out


def check_export_source(
    config: DecoderConfig, reader: ConsolidatedReader, extra: dict[str, Tensor], path: Path, identity: Path
) -> None:
    """Refuse, before anything is written, a checkpoint whose tensors do not match the model's config:
    names, dense shapes, and every MoE layer's experts (their ids, and the shapes of its first one)."""
    model = meta_decoder(config)
    names = set(model.state_dict(keep_vars=True))
    have = reader.names() | set(extra)
    missing, unexpected = sorted(names - have), sorted(have - names)
    fix = "pass --hf-config with the model the run was started from"
    if missing or unexpected:
        raise ConversionError(
            f"checkpoint {path} does not match {identity}/config.json: missing {missing[:6]}, unexpected "
            f"{unexpected[:6]}; {fix}"
        )
    stored = {**reader.shapes, **{n: tuple(t.shape) for n, t in extra.items()}}
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for layer, parts in reader.expert_parameters.items():
        ids = reader.expert_ids.get(int(layer), [])
        want = shapes[next(iter(parts.values()))][0]
        if ids != list(range(want)):
            raise ConversionError(
                f"checkpoint {path}: MoE layer {layer} holds experts {ids[:4]}... ({len(ids)}), {identity}/config.json "
                f"implies {want}; {fix}"
            )
        for short, tensor in reader.expert(int(layer), 0).items():
            stored[parts[short]] = (want, *tensor.shape)
        reader.forget()
    for name, shape in shapes.items():
        if stored[name] != shape:
            raise ConversionError(
                f"checkpoint {path}: {name} has shape {list(stored[name])}, {identity}/config.json implies "
                f"{list(shape)}; {fix}"
            )


def origin_tensor(reader: ConsolidatedReader, extra: dict[str, Tensor], origin: Origin) -> Tensor:
    """The checkpoint tensor an origin names, as :func:`disassemble` takes it (an expert's row as ``[1, ...]``)."""
    if origin.all_experts:  # one layer's experts: the bound of a streaming export is a shard plus a layer
        ids = reader.expert_ids[origin.layer]
        return torch.stack([reader.expert(origin.layer, e)[origin.short] for e in ids])
    if origin.expert_id is not None:
        return reader.expert(origin.layer, origin.expert_id)[origin.short].unsqueeze(0)
    return extra[origin.canonical] if origin.canonical in extra else reader.tensor(origin.canonical)


def shard_tensors(
    keys: list[str],
    origins: dict[str, tuple[Origin, TensorMap]],
    reader: ConsolidatedReader,
    extra: dict[str, Tensor],
    dtype_of: Callable[[str], torch.dtype],
) -> dict[str, Tensor]:
    """The HF tensors of one shard, each origin read once (an expert's file gives its gate, up and down)."""
    wanted = set(keys)
    maps: dict[Origin, TensorMap] = {}
    for key in keys:
        maps.setdefault(*origins[key])
    out: dict[str, Tensor] = {}
    for origin, tmap in maps.items():
        parts = disassemble(tmap, origin_tensor(reader, extra, origin))
        for key, value in parts.items():
            if key in wanted:
                out[key] = value.to(dtype_of(key)).contiguous()
    return out


def export_hf(
    ckpt_dir: str | Path,
    out: str | Path,
    *,
    tag: str | None = None,
    dtype: torch.dtype | None = None,
    hf_config: str | Path | None = None,
    max_shard_bytes: int | None = None,
    say: Callable[[str], None] = print,
) -> Path:
    """Write the checkpoint in ``ckpt_dir`` (``latest`` or ``tag``) as an HF model directory ``out``.

    The model config comes from ``hf_config`` (an HF directory with config.json, and the tokenizer
    files to copy), default ``hf_model/`` beside the checkpoint. ``dtype`` defaults to the one its
    config.json declares. Shards (at most ``max_shard_bytes``, default 5 GiB) are written one at a
    time, each from the checkpoint files it needs, resumably (see the module's docstring).
    """
    root, out = Path(ckpt_dir), Path(out)
    _require_new_or_empty(out, "the Hugging Face model")
    path = resolve_checkpoint(root, tag) if (root / "latest").exists() or tag else None
    if path is None:
        if (root / "manifest.json").is_file():
            path = root
        else:
            raise CheckpointError(
                f"{root} has no 'latest' file and no manifest.json: pass --tag, or a checkpoint directory"
            )
    identity = Path(hf_config) if hf_config is not None else find_hf_model_dir(path, root)
    if identity is None:
        raise ConversionError(
            f"no {HF_MODEL_DIR}/config.json beside {path}: the checkpoint was not made by import-hf or a model=hf "
            "run; pass --hf-config with the Hugging Face directory the model was started from"
        )
    config = hf.load_config(identity)
    reader = ConsolidatedReader(path)
    extra = {} if "buffers" in reader.manifest else _older_checkpoint_buffers(path, identity, reader.names())
    check_export_source(config, reader, extra, path, identity)
    dtype = dtype or config_dtype(identity)
    hf_config_object = hf.hf_config_from_decoder(config, dtype)  # refuses what the family cannot express
    fam = family(config.hf_model_type)

    def dtype_of(key: str) -> torch.dtype:
        return stored_dtype([key], fam, dtype, None)

    expected = expected_keys(config)
    sizes = [(key, 0, nbytes(shape, dtype_of(key))) for key, shape in expected.items()]
    file_of = plan_shards(sizes, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    shards: dict[str, list[str]] = {}
    for key, file in file_of.items():
        shards.setdefault(file, []).append(key)
    origins = hf_origins(config, reader)
    fingerprint = {
        "command": "export-hf",
        "checkpoint": str(path.resolve()),
        "manifest": file_checksum(path / "manifest.json"),
        "config": [str(identity.resolve()), file_checksum(identity / "config.json")],
        "dtype": str(dtype),
        "max_shard_bytes": max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
    }
    clear_dead_staging(out)  # what conversions of earlier versions left
    with resumable.resumable_output(out, fingerprint, say) as staged:
        todo = [file for file in shards if staged.entry(file) is None]
        needed = sum(n + SHARD_KEY_OVERHEAD for key, _, n in sizes if file_of[key] in todo) + _small_files_bytes(
            identity
        )
        require_disk_space(out, needed + _margin(needed), "the Hugging Face model")
        for file in todo:
            tensors = shard_tensors(shards[file], origins, reader, extra, dtype_of)
            write_shards(staged.tree, tensors, file_of)
            del tensors
            reader.forget()
            staged.record(file, file_entry(staged.tree / file))
        write_index(staged.tree, file_of, sum(n for _, _, n in sizes))
        hf_config_object.save_pretrained(str(staged.tree))
        hf.copy_tokenizer_files(identity, staged.tree)
    return out


SHARD_KEY_OVERHEAD = 256  # a key's entry in its shard's JSON header


def _older_checkpoint_buffers(path: Path, identity: Path, present: set[str]) -> dict[str, Tensor]:
    """A checkpoint saved before checkpoints held buffers: its buffers from ``hf_model/buffers.safetensors``
    (their values at the start of the run), unless the run trained them."""
    from safetensors.torch import load_file

    trained = json.loads((identity / TRAINING_FILE).read_text()) if (identity / TRAINING_FILE).is_file() else {}
    if trained.get("expert_bias_update_rate", 0) > 0:
        raise ConversionError(
            f"checkpoint {path} predates buffers in checkpoints, and {identity}/{TRAINING_FILE} says the run trained "
            f"the routers' expert_bias (moe.expert_bias_update_rate={trained['expert_bias_update_rate']}): the bias "
            "it learned is lost, so the export would route differently; export a checkpoint saved by this version"
        )
    file = identity / BUFFERS_FILE_OF_OLDER_RUNS
    saved = load_file(str(file)) if file.is_file() else {}
    return {name: tensor for name, tensor in saved.items() if name not in present}


def describe(path: Path) -> str:
    """One line about an HF directory written by :func:`export_hf`."""
    index = path / "model.safetensors.index.json"
    shards = len(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else 1
    return f"{path}: {read_config_json(path).get('architectures', ['?'])[0]}, {shards} shard(s)"


# ---------------------------------------------------------------- command line (registered by checkpoint_tool)

ERRORS: tuple[type[Exception], ...] = (ConversionError, hf.HFConversionError)


QUANTIZED_NOTE = (
    "export-hf writes bf16 (or --dtype) tensors and a config.json without quantization_config: "
    "re-quantize the export yourself if you need the quantized format"
)


def quantization_note(hf_dir: str | Path) -> str | None:
    """A line for a quantized source (its weights are dequantized on read); None for any other."""
    method = hf.SafetensorsDir(hf_dir).quantization
    if method is None:
        return None
    return f"{hf_dir} is quantized ({method}): its weights were dequantized to bf16 on read; {QUANTIZED_NOTE}"


def cmd_import_hf(args: argparse.Namespace) -> None:
    path = import_hf(
        args.hf_dir,
        args.out,
        tag=args.tag,
        upcycle_experts=args.upcycle_experts,
        top_k=args.top_k,
        seed=args.seed,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )
    what = f"upcycled to {args.upcycle_experts} experts, top-{args.top_k}" if args.upcycle_experts else "weights"
    print(f"wrote {path} ({what}; step 0, optimizer starts fresh) and {Path(args.out) / HF_MODEL_DIR}/")
    note = quantization_note(args.hf_dir)
    if note is not None:
        print(note)


def cmd_export_hf(args: argparse.Namespace) -> None:
    max_shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else None
    out = export_hf(args.dir, args.out, tag=args.tag, dtype=dtype, hf_config=args.hf_config, max_shard_bytes=max_shard)
    print(f"wrote {describe(out)}")
    if args.hf_config is not None and read_config_json(args.hf_config).get("quantization_config") is not None:
        print(f"{args.hf_config} is quantized: {QUANTIZED_NOTE}")
    elif args.hf_config is None:
        identity = find_hf_model_dir(Path(args.dir), Path(args.dir))
        record = identity / QUANTIZED_SOURCE_FILE if identity is not None else None
        if record is not None and record.is_file():
            method = json.loads(record.read_text()).get("quantization")
            print(f"the checkpoint was imported from a quantized ({method}) model: {QUANTIZED_NOTE}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def add_commands(sub: argparse._SubParsersAction) -> dict:
    """Add ``import-hf`` and ``export-hf`` to an argparse sub-parser set; returns {name: handler}."""
    imp = sub.add_parser("import-hf", help="a Hugging Face model directory -> a topology-free checkpoint")
    imp.add_argument("hf_dir", help="config.json + model.safetensors (or shards with an index)")
    imp.add_argument("--out", required=True, help="checkpoint directory to create")
    imp.add_argument("--tag", default="imported")
    imp.add_argument("--upcycle-experts", type=_positive_int, help="upcycle a dense Llama/Qwen3 to this many experts")
    imp.add_argument("--top-k", type=_positive_int, help="experts per token of the upcycled model")
    imp.add_argument("--seed", type=int, default=0, help="seed of the upcycled routers")
    imp.add_argument(
        "--dtype", choices=sorted(DTYPES), help="store the tensors in this dtype (default: each keeps the source's)"
    )
    exp = sub.add_parser("export-hf", help="a checkpoint (any run, any layout) -> a Hugging Face model directory")
    exp.add_argument("dir", help="checkpoint directory (with 'latest'), or one checkpoint's directory")
    exp.add_argument("--tag")
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="auto: config.json's dtype")
    exp.add_argument(
        "--hf-config", help=f"HF directory with the model's config.json (default: {HF_MODEL_DIR}/ beside it)"
    )
    exp.add_argument(
        "--max-shard-mb", type=float, help="largest safetensors shard, in MiB (default 5 GiB; memory holds about one)"
    )
    return {"import-hf": cmd_import_hf, "export-hf": cmd_export_hf}
