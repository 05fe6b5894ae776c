"""Our model -> a Hugging Face directory in the Hub's layout (config.json, safetensors shards, index,
tokenizer files), loadable by ``transformers.AutoModelForCausalLM.from_pretrained``."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.comm import group_rank, group_size
from ..core.layer import MoELayer
from ..models.decoder import DecoderConfig
from .families import HFConversionError, family, hf_config_from_decoder
from .load import _map, expected_keys, local_tensors, model_config, nbytes
from .safetensors_io import INDEX_FILE, plan_shards, write_index, write_shards
from .weights import disassemble, mtp_copy_keys

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a plain :class:`Decoder` as a Hugging Face model directory.

    With expert parallelism call it on every rank of one expert-parallel group (e.g. data-parallel
    replica 0): each rank writes the shards of its own experts, nothing is gathered; EP rank 0 also
    writes the dense tensors, config.json, the index and the tokenizer files (from ``tokenizer_dir``,
    default: the directory the model was loaded from). ``dtype`` converts the tensors (default: the
    model's). Returns ``path``. A pipeline's weights are exported from its topology-free checkpoint
    with :func:`save_state_dict`.
    """
    config = model_config(model)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    ep_group = layers[0].ep_group if layers else None
    tensors = {canonical: (tensor, ids) for canonical, (_, tensor, ids) in local_tensors(model).items()}
    if family(config.hf_model_type).fused_experts and group_size(ep_group) > 1:
        tensors = _gather_fused_experts(tensors, config, ep_group)
    if tokenizer_dir is None:
        tokenizer_dir = getattr(model, "hf_source_dir", None)
    dtype = dtype or model_dtype(tensors)
    _save(
        config, tensors, Path(path), dtype, tokenizer_dir, max_shard_bytes, group_rank(ep_group), group_size(ep_group)
    )
    if group_size(ep_group) > 1:
        dist.barrier(group=ep_group)  # every shard is on disk when any rank returns
    return Path(path)


def save_state_dict(
    state_dict: dict[str, Tensor],
    config: DecoderConfig,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a full plain-model state dict (canonical names, experts stacked by global id) as an HF
    directory, in one process; e.g. the consolidated weights of a topology-free checkpoint."""
    all_ids = range(config.moe.num_experts) if config.moe else None
    tensors = {}
    for name, tensor in state_dict.items():
        stacked = ".experts." in name and name.rsplit(".", 1)[-1] in ("w1", "w2", "b1", "b2")
        tensors[name] = (tensor, all_ids if stacked else None)
    dtype = dtype or model_dtype(tensors)
    _save(config, tensors, Path(path), dtype, tokenizer_dir, max_shard_bytes, 0, 1)
    return Path(path)


def _gather_fused_experts(
    tensors: dict[str, tuple[Tensor, range | None]], config: DecoderConfig, ep_group
) -> dict[str, tuple[Tensor, range | None]]:
    """A family that stores all experts of a layer in one HF tensor writes it from EP rank 0: the
    expert tensors are gathered there (and dropped on the other ranks, which write none of them)."""
    out = {}
    rank, root = group_rank(ep_group), dist.get_global_rank(ep_group, 0)
    for name, (tensor, ids) in tensors.items():
        if ids is None:
            out[name] = (tensor, ids)
            continue
        parts = [torch.empty_like(tensor) for _ in range(group_size(ep_group))] if rank == 0 else None
        dist.gather(tensor.detach().contiguous(), parts, dst=root, group=ep_group)
        if rank == 0:
            out[name] = (torch.cat(parts), range(config.moe.num_experts))
    return out


def model_dtype(tensors: dict[str, tuple[Tensor, range | None]]) -> torch.dtype:
    return tensors["embed.weight"][0].dtype


def _save(
    config: DecoderConfig,
    tensors: dict[str, tuple[Tensor, range | None]],
    path: Path,
    dtype: torch.dtype,
    tokenizer_dir: str | Path | None,
    max_shard_bytes: int,
    ep_rank: int,
    ep_size: int,
) -> None:
    hf_config = hf_config_from_decoder(config, dtype)  # refuses what the family cannot express
    fam = family(config.hf_model_type)
    expected = expected_keys(config)
    # The same plan on every rank: key -> owner (EP rank holding it), in a fixed order.
    experts_per_rank = config.moe.num_experts // ep_size if config.moe else 1
    owner: dict[str, int] = {}
    for key in expected:
        parts = key.split(".")
        is_routed_expert = len(parts) > 5 and parts[4] == "experts" and parts[5].isdigit()
        owner[key] = int(parts[5]) // experts_per_rank if is_routed_expert else 0
    mine: dict[str, Tensor] = {}
    for canonical, (tensor, ids) in tensors.items():
        for key, value in disassemble(_map(canonical, fam, ids), tensor.detach()).items():
            value = value.to(torch.float32 if fam.keeps_fp32(key) else dtype)
            if key not in expected:
                raise HFConversionError(f"{canonical} gives {key}, which the config does not describe")
            if owner[key] == ep_rank:
                mine[key] = value
    for copy, original in mtp_copy_keys(config.num_layers, config.mtp_layers, config.tie_embeddings).items():
        if owner[copy] == ep_rank:  # DeepSeek's and vLLM's MTP readers load each MTP layer's own copies
            mine[copy] = mine[original].clone()
    missing = [k for k, o in owner.items() if o == ep_rank and k not in mine]
    if missing:
        raise HFConversionError(f"the model holds no tensor for {missing[:4]}: its state does not match its config")
    sizes = [
        (key, owner[key], nbytes(shape, torch.float32 if fam.keeps_fp32(key) else dtype))
        for key, shape in expected.items()
    ]
    file_of = plan_shards(sizes, max_shard_bytes)
    path.mkdir(parents=True, exist_ok=True)
    if ep_rank == 0:  # weights of an earlier save into this directory would mix with ours
        planned = set(file_of.values())
        for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
            if stale.name not in planned and stale.is_file():
                stale.unlink()
    write_shards(path, mine, file_of)
    if ep_rank == 0:
        write_index(path, file_of, sum(n for _, _, n in sizes))
        hf_config.save_pretrained(str(path))
        copy_tokenizer_files(tokenizer_dir, path)


def copy_tokenizer_files(source: str | Path | None, dest: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files of an HF directory; returns their names."""
    if source is None or Path(source).resolve() == dest.resolve():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        file = Path(source) / name
        if file.is_file():
            shutil.copyfile(file, dest / name)
            copied.append(name)
    return copied
