"""Hugging Face directory -> our model: config mapping, a full check from the headers, then each rank
reads only the tensors it holds (its experts; its pipeline stage's layers)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..core.comm import ProcessGroup
from ..core.layer import MoELayer, moe_layers
from ..integration.deepspeed import mark_expert_parameters
from ..integration.pipeline import decoder_canonical_names
from ..models.decoder import Decoder, DecoderConfig
from .families import HFConversionError, decoder_config_from_hf, family, load_hf_config, read_config_json
from .fused_experts import fused_expert_keys, fused_layout_message
from .quantization import check_quantization
from .safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsDir
from .tied_embeddings import HEAD_KEY, untie_if_stored_apart
from .weights import TensorMap, assemble, expected_hf_shapes, mtp_copy_keys, tensor_map

EMBED_KEY = "model.embed_tokens.weight"


class TensorSource(Protocol):
    """Where HF tensors come from: a safetensors directory, or an upcycling view of one."""

    path: Path
    shapes: dict[str, tuple[int, ...]]

    def keys(self) -> set[str]: ...
    def get(self, key: str) -> Tensor: ...
    def torch_dtype(self, key: str) -> torch.dtype: ...


def load_config(
    path: str | Path,
    *,
    capacity_factor: float | None = None,
    moe_overrides: dict[str, Any] | None = None,
    mtp_layers: int | None = None,
    mtp_loss_weight: float | None = None,
) -> DecoderConfig:
    """The :class:`DecoderConfig` of the HF model in ``path`` (its config.json); see ``from_pretrained``.

    Refuses a ``quantization_config`` that cannot be read. Embeddings that config.json ties but the
    weights beside it store as two different matrices come back untied, as transformers loads them.
    ``mtp_layers`` / ``mtp_loss_weight``: see :func:`with_mtp`.
    """
    check_quantization(read_config_json(path), path)  # before transformers parses quantization_config
    config = decoder_config_from_hf(load_hf_config(path), capacity_factor=capacity_factor, moe_overrides=moe_overrides)
    if config.tie_embeddings and any((Path(path) / name).is_file() for name in (SINGLE_FILE, INDEX_FILE)):
        config = untie_if_stored_apart(config, SafetensorsDir(path))
    return with_mtp(config, mtp_layers, mtp_loss_weight)


def with_mtp(config: DecoderConfig, mtp_layers: int | None, mtp_loss_weight: float | None) -> DecoderConfig:
    """``config`` keeping only its first ``mtp_layers`` MTP modules (None: all; 0: none, and the
    checkpoint's MTP layers are skipped, as transformers skips them) and training them with
    ``mtp_loss_weight`` (None: the default)."""
    changes: dict[str, Any] = {}
    if mtp_layers is not None:
        if isinstance(mtp_layers, bool) or not isinstance(mtp_layers, int) or not 0 <= mtp_layers <= config.mtp_layers:
            raise HFConversionError(
                f"model.mtp_layers={mtp_layers!r} is invalid: the checkpoint has {config.mtp_layers} MTP module(s) "
                f"(config.json num_nextn_predict_layers); keep 0..{config.mtp_layers} of them, or null for all"
            )
        changes["mtp_layers"] = mtp_layers
    if mtp_loss_weight is not None:
        changes["mtp_loss_weight"] = mtp_loss_weight
    return dataclasses.replace(config, **changes) if changes else config


def from_pretrained(
    path: str | Path,
    *,
    ep_group: ProcessGroup | None = None,
    dtype: torch.dtype | None = None,
    capacity_factor: float | None = None,
    moe_overrides: dict[str, Any] | None = None,
    mtp_layers: int | None = None,
    device: torch.device | str = "cpu",
) -> Decoder:
    """Our plain :class:`Decoder` holding the weights of the Hugging Face model in ``path``.

    Args:
        path: a directory with config.json and ``model.safetensors`` or sharded safetensors with
            ``model.safetensors.index.json``.
        ep_group: the expert-parallel group; this rank builds and reads only its own experts.
        dtype: parameter dtype; None keeps the checkpoint's (that of its embedding).
        capacity_factor: training capacity factor of the MoE layers; None (default) is dropless,
            as the original models are. Evaluation is always dropless.
        moe_overrides: any other :class:`MoEConfig` field, e.g. ``{"aux_loss_coeff": 0.0}``.
        mtp_layers: how many of the checkpoint's multi-token-prediction modules to build and read
            (DeepSeek-V3); None: all of them, 0: none.
        device: where the parameters live.

    The whole checkpoint is checked against config.json from the file headers before anything is
    read (every rank reaches the same verdict, and none enters a collective): missing shards, missing
    or unexpected tensors and wrong shapes raise :class:`HFConversionError` naming the key.
    """
    config = load_config(path, capacity_factor=capacity_factor, moe_overrides=moe_overrides, mtp_layers=mtp_layers)
    source = SafetensorsDir(path)
    return build_and_load(config, source, ep_group=ep_group, dtype=dtype, device=device)


def build_and_load(
    config: DecoderConfig,
    source: TensorSource,
    *,
    ep_group: ProcessGroup | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Decoder:
    """Build a :class:`Decoder` without initialising it and fill it from ``source``."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise HFConversionError(
            f"dtype={dtype!r} is invalid: give a floating torch.dtype (torch.bfloat16, ...) or None"
        )
    check_source(config, source)
    if dtype is None:
        dtype = source.torch_dtype(EMBED_KEY)
    with torch.device("meta"):
        model = Decoder(config, ep_group=ep_group)
    model.to_empty(device=device)
    for layer in moe_layers(model):  # to_empty makes new Parameters: restore DeepSpeed's expert flags
        mark_expert_parameters(layer.experts.parameters(), layer.ep_size)
    _zero_non_persistent_buffers(model)
    model.to(dtype)
    _keep_fp32(model, config)
    load_weights(model, source, check=False)
    model.hf_source_dir = str(source.path)
    return model


def _keep_fp32(model: nn.Module, config: DecoderConfig) -> None:
    """Parameters whose HF tensors transformers keeps in float32 (GLM's router) stay float32."""
    fam = family(config.hf_model_type)
    for canonical, (_, tensor, ids) in local_tensors(model).items():
        if isinstance(tensor, nn.Parameter) and all(fam.keeps_fp32(k) for k in _map(canonical, fam, ids).hf_keys):
            tensor.data = tensor.data.float()


def _zero_non_persistent_buffers(model: nn.Module) -> None:
    saved = set(model.state_dict(keep_vars=True))
    for name, buf in model.named_buffers():
        if name not in saved:
            buf.zero_()


def model_config(model: nn.Module) -> DecoderConfig:
    config = getattr(model, "config", None) or getattr(model, "decoder_config", None)
    if not isinstance(config, DecoderConfig):
        raise HFConversionError(
            f"{type(model).__name__} is not a Decoder or decoder_pipeline module: only the decoder family "
            "converts to and from Hugging Face checkpoints"
        )
    return config


def local_tensors(model: nn.Module) -> dict[str, tuple[str, Tensor, range | None]]:
    """Canonical name -> (local name, tensor, global expert ids of its rows or None), params and buffers.

    Works for a plain :class:`Decoder` and for one stage of ``decoder_pipeline`` (whose local names
    map to the plain model's through ``decoder_canonical_names``).
    """
    config = model_config(model)
    state = model.state_dict(keep_vars=True)
    if isinstance(model, Decoder):
        names = {name: name for name in state}
    else:
        names = decoder_canonical_names(model, config, buffers=True)
    expert_rows: dict[str, range] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, MoELayer):
            ids = range(module.experts.first_expert_id, module.experts.first_expert_id + module.num_local_experts)
            for short, _ in module.experts.named_parameters():
                expert_rows[f"{prefix}.experts.{short}"] = ids
    out = {}
    for local, tensor in state.items():
        canonical = names[local]
        out[canonical] = (local, tensor, expert_rows.get(local))
    return out


def expected_keys(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every HF key of the full model described by ``config``, with its shape."""
    fam = family(config.hf_model_type)
    with torch.device("meta"):
        full = Decoder(config)
    expected: dict[str, tuple[int, ...]] = {}
    for canonical, tensor in full.state_dict().items():
        tmap = _map(canonical, fam, range(config.moe.num_experts) if config.moe else None)
        expected.update(expected_hf_shapes(tmap, tuple(tensor.shape)))
    for copy, original in mtp_copy_keys(config.num_layers, config.mtp_layers, config.tie_embeddings).items():
        expected[copy] = expected[original]
    return expected


def _map(canonical: str, fam, expert_ids: range | None) -> TensorMap:
    tmap = tensor_map(canonical, fam, expert_ids)
    if tmap is None:
        raise HFConversionError(f"tensor {canonical} has no counterpart in a {fam.model_type} checkpoint")
    return tmap


def check_source(config: DecoderConfig, source: TensorSource) -> None:
    """Refuse a checkpoint whose tensors do not match ``config``: missing, unexpected, wrong shape."""
    expected = expected_keys(config)
    present = source.keys()
    missing = sorted(set(expected) - present)
    if missing and all(_layer_of(k) is not None and _layer_of(k) >= config.num_layers for k in missing):
        raise HFConversionError(
            f"{source.path}: config.json announces {config.mtp_layers} multi-token-prediction layer(s) "
            f"(num_nextn_predict_layers), but {len(missing)} of their tensors are missing, e.g. {missing[:4]} "
            "(transformers' save_pretrained drops them): load without them, mtp_layers=0 (Hydra model.mtp_layers=0)"
        )
    if missing and fused_expert_keys(present):
        raise HFConversionError(fused_layout_message(source.path, config.hf_model_type, fused_expert_keys(present)))
    if missing:
        raise HFConversionError(
            f"{source.path}: {len(missing)} tensor(s) that config.json implies are missing, e.g. {missing[:4]}: "
            "the weights do not belong to this config.json, or a shard is incomplete"
        )
    unexpected = sorted(k for k in present - set(expected) if not _ignorable(k, config))
    if unexpected:
        raise HFConversionError(
            f"{source.path}: {len(unexpected)} tensor(s) that config.json does not describe, e.g. {unexpected[:4]}: "
            "the weights do not belong to this config.json (or use options we do not support)"
        )
    for key, shape in expected.items():
        if tuple(source.shapes[key]) != shape:
            raise HFConversionError(
                f"{source.path}: tensor {key} has shape {list(source.shapes[key])}, config.json implies {list(shape)}: "
                "the weights do not match config.json (check hidden_size, intermediate sizes, heads, head_dim, "
                "vocab_size and the number of experts)"
            )
    for key in expected:
        source.torch_dtype(key)  # refuses non-float tensors


def _ignorable(key: str, config: DecoderConfig) -> bool:
    """Keys transformers ignores too: RoPE caches, the LM head of tied embeddings (equal to the
    embedding: ``load_config`` unties them otherwise), and the layers after the last one we hold (the
    multi-token-prediction layers of a model built without them, or with fewer)."""
    if key.endswith("rotary_emb.inv_freq") or (key == HEAD_KEY and config.tie_embeddings):
        return True
    layer = _layer_of(key)
    return layer is not None and layer >= config.num_layers + config.mtp_layers


def _layer_of(key: str) -> int | None:
    """The decoder layer index of an HF key (``model.layers.{i}.*``), or None."""
    parts = key.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None


@torch.no_grad()
def load_weights(model: nn.Module, source: TensorSource | str | Path, *, check: bool = True) -> None:
    """Fill ``model`` (a :class:`Decoder` or a ``decoder_pipeline`` stage) from an HF checkpoint.

    Reads only the tensors this rank holds. With ``check`` the whole checkpoint is validated first.
    """
    config = model_config(model)
    if not hasattr(source, "get"):
        source = SafetensorsDir(source)
    if check:
        check_source(config, source)
    fam = family(config.hf_model_type)
    tensors = local_tensors(model)
    for canonical, (_, tensor, expert_ids) in tensors.items():
        tmap = _map(canonical, fam, expert_ids)
        value = assemble(tmap, read_hf_tensors(source, tmap))
        if tuple(value.shape) != tuple(tensor.shape):
            raise HFConversionError(
                f"{source.path}: {canonical} assembles to shape {list(value.shape)}, "
                f"the model holds {list(tensor.shape)}"
            )
        tensor.copy_(value)
    if any(canonical.startswith("mtp.") for canonical in tensors):
        check_mtp_copies(config, source)


def check_mtp_copies(config: DecoderConfig, source: TensorSource) -> None:
    """Refuse MTP layers whose embedding or output-head copy differs from the main model's: our MTP
    modules share the main embedding and head (as DeepSeek-V3 trains them), so such a checkpoint
    has no faithful counterpart here. Run where the MTP modules are read (the last pipeline stage)."""
    originals: dict[str, Tensor] = {}
    for copy, original in mtp_copy_keys(config.num_layers, config.mtp_layers, config.tie_embeddings).items():
        if original not in originals:
            originals[original] = source.get(original)
        if not torch.equal(source.get(copy), originals[original]):
            raise HFConversionError(
                f"{source.path}: tensor {copy} differs from {original}: our multi-token-prediction modules share the "
                "main model's embedding and output head, so its copies must equal them; load without the MTP "
                "modules (mtp_layers=0, Hydra model.mtp_layers=0) or make the copies equal"
            )


def read_hf_tensors(source: TensorSource, tmap: TensorMap) -> dict[str, Tensor]:
    """The HF tensors of ``tmap``; of a fused expert tensor only the rows ``tmap.rows`` (this rank's
    experts), read as a slice where the source can."""
    if tmap.kind != "fused":
        return {key: source.get(key) for key in tmap.hf_keys}
    key, rows = tmap.keys[0][0], tmap.rows
    if rows.start == 0 and rows.stop == source.shapes[key][0]:
        return {key: source.get(key)}
    get_rows = getattr(source, "get_rows", None)
    if get_rows is not None:
        return {key: torch.stack([get_rows(key, j) for j in rows])}
    return {key: source.get(key)[rows.start : rows.stop]}


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
