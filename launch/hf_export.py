"""``export-hf``: a checkpoint (any run, saved at any layout) as a Hugging Face model directory,
streamed one safetensors shard at a time.

The checkpoint's tensors are full values under global expert ids, so the export only renames and
splits them (:func:`hf_origins`); each shard is gathered from the checkpoint files it needs and
written through a resumable staging directory; see :mod:`launch.hf_convert` for the guarantees.
Checkpoints hold the persistent buffers too (GLM's correction bias, trained or not), so an export
carries the bias of the step it exports.
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
    TRAINING_FILE,
    ConversionError,
    config_dtype,
    find_hf_model_dir,
    meta_decoder,
    require_disk_space,
    require_new_or_empty,
    small_files_bytes,
    space_margin,
    stored_dtype,
)
from moe_parallel import hf
from moe_parallel.checkpoints import resumable
from moe_parallel.checkpoints.checkpoint import CheckpointError, ConsolidatedReader, resolve_checkpoint
from moe_parallel.checkpoints.store import clear_dead_staging, file_checksum, file_entry
from moe_parallel.hf.families import family, read_config_json
from moe_parallel.hf.load import expected_keys, nbytes
from moe_parallel.hf.safetensors_io import plan_shards, write_index, write_shards
from moe_parallel.hf.save import DEFAULT_MAX_SHARD_BYTES
from moe_parallel.hf.weights import TensorMap, disassemble, tensor_map
from moe_parallel.models.decoder import DecoderConfig

HF_MODEL_BUFFERS_FILE = "buffers.safetensors"  # in hf_model/: buffers for checkpoints that do not hold them
SHARD_KEY_OVERHEAD = 256  # a key's entry in its shard's JSON header


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
    time, each from the checkpoint files it needs, resumably (see :mod:`launch.hf_convert`).
    """
    root, out = Path(ckpt_dir), Path(out)
    require_new_or_empty(out, "the Hugging Face model")
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
    extra = {} if "buffers" in reader.manifest else buffers_from_hf_model_dir(path, identity, reader.names())
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
    clear_dead_staging(out)  # private staging directories whose writer is provably gone
    with resumable.resumable_output(out, fingerprint, say) as staged:
        todo = [file for file in shards if staged.entry(file) is None]
        needed = sum(n + SHARD_KEY_OVERHEAD for key, _, n in sizes if file_of[key] in todo) + small_files_bytes(
            identity
        )
        require_disk_space(out, needed + space_margin(needed), "the Hugging Face model")
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


def buffers_from_hf_model_dir(path: Path, identity: Path, present: set[str]) -> dict[str, Tensor]:
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
    file = identity / HF_MODEL_BUFFERS_FILE
    saved = load_file(str(file)) if file.is_file() else {}
    return {name: tensor for name, tensor in saved.items() if name not in present}


def describe(path: Path) -> str:
    """One line about an HF directory written by :func:`export_hf`."""
    index = path / "model.safetensors.index.json"
    shards = len(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else 1
    return f"{path}: {read_config_json(path).get('architectures', ['?'])[0]}, {shards} shard(s)"
