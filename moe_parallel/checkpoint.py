"""Topology-free checkpoints: experts under global ids, loadable at any PP / EP / DP layout.

Layout of one checkpoint (``<dir>/<tag>/``)::

    manifest.json                      format, step, layers, experts, files (with sizes)
    dense/stage_<s>.pt                 {canonical name: {"param", "exp_avg", "exp_avg_sq"}}
    experts/layer_<L>/expert_<id>.pt   {"w1": {"param", "exp_avg", ...}, "w2": ...} of one expert
    trainer.pt                         step, scheduler, client state (data position, W&B run id, ...)
    rng/rank_<r>.pt                    RNG states (restored when the world size is unchanged)

Every tensor is the full fp32 value (ZeRO partitions are gathered with DeepSpeed's
``safe_get_full_*`` helpers), so loading is a matter of picking the slices a rank owns. A save is
atomic: files go to ``<tag>.tmp-<id>/``, which rank 0 renames to ``<tag>`` after every rank has
finished, and only then points ``latest`` at it. A crash mid-save leaves the previous checkpoint
and ``latest`` untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .comm import broadcast_from_rank0
from .layer import MoELayer, moe_layers

FORMAT_VERSION = 1
OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


# ---------------------------------------------------------------- where this rank sits


@dataclass
class _Placement:
    rank: int
    world_size: int
    stage_id: int
    dense_writer: bool  # data-parallel rank 0 of its stage
    expert_writer: bool  # expert-data-parallel rank 0 (one copy of each expert is written)


def _placement(engine) -> _Placement:
    from deepspeed.utils import groups

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    stage_id = getattr(engine, "stage_id", 0)
    if not dist.is_initialized():
        return _Placement(rank, world, stage_id, True, True)
    mpu = getattr(engine, "mpu", None)
    dp_rank = mpu.get_data_parallel_rank() if mpu is not None else dist.get_rank(groups._get_data_parallel_group())
    layers = numbered_moe_layers(engine.module)
    edp_rank = groups._get_expert_data_parallel_rank(layers[0].expert_group_name) if layers else dp_rank
    return _Placement(rank, world, stage_id, dp_rank == 0, edp_rank == 0)


def numbered_moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers; their ``layer_number`` names their experts' files, so it must be unique."""
    layers = moe_layers(model)
    numbers = [layer.layer_number for layer in layers]
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicates:
        raise CheckpointError(
            f"several MoE layers share layer_number {duplicates}: give each MoELayer its own "
            "layer_number (its position in the model), which names its experts in checkpoints"
        )
    return layers


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Local parameter name -> layout-independent name (a model may define ``canonical_parameter_names``)."""
    if hasattr(model, "canonical_parameter_names"):
        return model.canonical_parameter_names()
    return {name: name for name, _ in model.named_parameters()}


def _expert_params(model: nn.Module) -> dict[int, tuple[MoELayer, dict[str, nn.Parameter]]]:
    """id(param) -> (layer, {short name: param}) for the routed-expert parameters."""
    owned = {}
    for layer in numbered_moe_layers(model):
        named = {n: p for n, p in layer.experts.named_parameters()}
        for p in named.values():
            owned[id(p)] = (layer, named)
    return owned


# ---------------------------------------------------------------- full values of (possibly ZeRO-partitioned) state


def _optimizer(engine):
    return getattr(engine, "optimizer", None)


def _inner_state(engine) -> dict:
    """State of the torch optimizer inside DeepSpeed's wrappers (keyed by the tensors it updates)."""
    opt = _optimizer(engine)
    return getattr(getattr(opt, "optimizer", opt), "state", {})


def _optimizer_step_count(engine) -> int | None:
    steps = [s["step"] for s in _inner_state(engine).values() if "step" in s]
    return int(max(float(v) for v in steps)) if steps else None


def _masters(engine) -> dict[int, Tensor]:
    """Model parameter id -> the fp32 copy the optimizer updates, for DeepSpeed's per-parameter
    mixed-precision wrapper (bf16 without ZeRO); empty where parameters are updated in place or
    through ZeRO's fragment mappings."""
    opt = _optimizer(engine)
    low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if low is None:
        return {}
    if high is None:
        raise CheckpointError(
            f"{type(opt).__name__} keeps flat fp32 master weights that checkpoints cannot address per "
            "parameter: use deepspeed.zero_optimization.stage 1 or 2"
        )
    return {id(p): m for lows, highs in zip(low, high) for p, m in zip(lows, highs)}


def _is_zero_mapped(param: Tensor) -> bool:
    # Set (possibly to None, for a parameter outside this rank's partition) on every parameter that
    # ZeRO or the bf16 optimizer partitions; the safe_* accessors are collectives over its group.
    return hasattr(param, "_hp_mapping")


def _full_param(param: Tensor, master: Tensor | None) -> Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    if _is_zero_mapped(param):
        return safe_get_full_fp32_param(param).float().cpu().clone()
    return (param if master is None else master).detach().float().cpu().clone()


def _full_optim_state(engine, param: Tensor, master: Tensor | None) -> dict[str, Tensor]:
    from deepspeed.utils import safe_get_full_optimizer_state

    if _is_zero_mapped(param):
        return {k: safe_get_full_optimizer_state(param, k).float().cpu().clone() for k in OPTIM_KEYS}
    state = _inner_state(engine).get(param if master is None else master, {})
    return {k: state[k].float().cpu().clone() for k in OPTIM_KEYS if k in state}


def _set_param(param: Tensor, value: Tensor, master: Tensor | None) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    with torch.no_grad():
        param.copy_(value.to(param.dtype))
        if master is not None:
            master.copy_(value.to(master.dtype))
    if _is_zero_mapped(param):
        safe_set_full_fp32_param(param, value.to(param.device, torch.float32))


def _set_optim_state(engine, param: Tensor, state: dict[str, Tensor], step: int, master: Tensor | None) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    if not state:
        return
    if _is_zero_mapped(param):
        for k in OPTIM_KEYS:
            safe_set_full_optimizer_state(param, state[k].to(param.device, torch.float32), k)
        return
    target = param if master is None else master
    slot = _inner_state(engine)[target]
    for k in OPTIM_KEYS:
        slot[k] = state[k].to(target.device, target.dtype).clone()
    slot["step"] = torch.tensor(float(step))


def _link_flat_optimizer_states(engine, create_at_step: int | None = None) -> None:
    """Point every parameter's ZeRO/bf16 fragment mapping at its Adam state.

    DeepSpeed (0.19) links optimizer states lazily after the *first param group's* first step, so
    later groups (our expert groups among them) stay unlinked and ``safe_*_optimizer_state`` fails
    for them. Link all groups here; with ``create_at_step`` (loading into a fresh engine), create the
    Adam state first.
    """
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    opt = _optimizer(engine)
    lp_groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None)
    flat_groups = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(
        opt, "fp32_groups_flat_partition", None
    )
    if lp_groups is None or flat_groups is None:
        return  # ZeRO stage 0 in fp32: the optimizer holds the parameters themselves
    inner_state = opt.optimizer.state
    for lp_params, flat in zip(lp_groups, flat_groups):
        state = inner_state[flat]
        if not state and create_at_step is not None:
            state.update(
                step=torch.tensor(float(create_at_step)),
                exp_avg=torch.zeros_like(flat),
                exp_avg_sq=torch.zeros_like(flat),
            )
        if state:
            lazy_init_hp_params_optimizer_state(lp_params, flat, inner_state)


def _set_optimizer_step(engine, step: int) -> None:
    """Adam's bias correction uses ``step``; ZeRO keeps it on its flat partitions."""
    for group_state in _inner_state(engine).values():
        if "step" in group_state:
            old = group_state["step"]
            group_state["step"] = torch.full_like(old, float(step)) if isinstance(old, Tensor) else step


# ---------------------------------------------------------------- save


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:8]}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    engine, save_dir: str | os.PathLike, tag: str | None = None, client_state: dict[str, Any] | None = None
) -> Path:
    """Save model, optimizer, scheduler, RNG and ``client_state``; every rank must call it.

    Returns the checkpoint's directory. ``tag`` defaults to ``step_<global_steps>``.
    """
    save_dir = Path(save_dir)
    step = int(getattr(engine, "global_steps", 0))
    tag = tag or f"step_{step:08d}"
    place = _placement(engine)
    staging = save_dir / broadcast_from_rank0(f"{tag}.tmp-{uuid.uuid4().hex[:8]}")
    if place.rank == 0:
        (staging / "dense").mkdir(parents=True, exist_ok=True)
        (staging / "experts").mkdir(exist_ok=True)
        (staging / "rng").mkdir(exist_ok=True)
    _barrier()

    model = engine.module
    _link_flat_optimizer_states(engine)
    names = canonical_names(model)
    experts = _expert_params(model)
    masters = _masters(engine)
    dense: dict[str, dict[str, Tensor]] = {}
    expert_files: dict[tuple[int, int], dict[str, dict[str, Tensor]]] = {}
    # Every rank walks its parameters in the same order: the gathers below are collectives.
    for local_name, param in model.named_parameters():
        master = masters.get(id(param))
        entry = {"param": _full_param(param, master), **_full_optim_state(engine, param, master)}
        if id(param) in experts:
            layer, named = experts[id(param)]
            short = next(n for n, p in named.items() if p is param)
            for j in range(layer.num_local_experts):
                key = (layer.layer_number, layer.experts.first_expert_id + j)
                expert_files.setdefault(key, {})[short] = {k: v[j].clone() for k, v in entry.items()}
        else:
            dense[names[local_name]] = entry

    if place.dense_writer:
        _atomic_torch_save(dense, staging / "dense" / f"stage_{place.stage_id}.pt")
    if place.expert_writer:
        for (layer_number, expert_id), state in expert_files.items():
            folder = staging / "experts" / f"layer_{layer_number}"
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_torch_save(state, folder / f"expert_{expert_id}.pt")
    _atomic_torch_save(_rng_state(), staging / "rng" / f"rank_{place.rank}.pt")
    if place.rank == 0:
        scheduler = getattr(engine, "lr_scheduler", None)
        trainer = {
            "step": step,
            "global_samples": int(getattr(engine, "global_samples", 0)),
            "optimizer_step": _optimizer_step_count(engine),  # may differ from `step` (warm-up steps)
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "client_state": client_state or {},
        }
        _atomic_torch_save(trainer, staging / "trainer.pt")
    expert_names = _gather_expert_param_names(model, names)

    if place.rank == 0:
        manifest = _manifest(staging, step, place.world_size, expert_names)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        final = save_dir / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        latest_tmp = save_dir / f"latest.tmp-{uuid.uuid4().hex[:8]}"
        latest_tmp.write_text(tag)
        os.replace(latest_tmp, save_dir / "latest")
    _barrier()
    return save_dir / tag


def _gather_expert_param_names(model: nn.Module, names: dict[str, str]) -> dict[str, dict[str, str]]:
    """{layer number: {"w1": canonical name of the stacked parameter, ...}} over all stages.

    Collective (all ranks); it is also the barrier after which every file is on disk.
    """
    local_names = {id(p): names[n] for n, p in model.named_parameters()}
    mine = {
        str(layer.layer_number): {short: local_names[id(p)] for short, p in layer.experts.named_parameters()}
        for layer in numbered_moe_layers(model)
    }
    if not dist.is_initialized():
        return mine
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {k: v for part in gathered for k, v in part.items()}


def _manifest(staging: Path, step: int, world_size: int, expert_names: dict[str, dict[str, str]]) -> dict[str, Any]:
    # Listed after every rank has written, so the manifest covers the MoE layers of every stage.
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*.pt"))
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "saved_world_size": world_size,
        "moe_layers": {str(k): v for k, v in _expert_ids_by_layer(files).items()},
        "expert_parameters": dict(sorted(expert_names.items(), key=lambda kv: int(kv[0]))),
        "files": {f: (staging / f).stat().st_size for f in files},
    }


def _expert_ids_by_layer(files) -> dict[int, list[int]]:
    """{layer number: sorted global expert ids} from ``experts/layer_<L>/expert_<id>.pt`` paths."""
    layers: dict[int, list[int]] = {}
    for path in files:
        if path.startswith("experts/"):
            _, layer, expert = path.split("/")
            layers.setdefault(int(layer.removeprefix("layer_")), []).append(int(expert[len("expert_") : -3]))
    return {layer: sorted(ids) for layer, ids in sorted(layers.items())}


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- load


def resolve_checkpoint(load_dir: str | os.PathLike, tag: str | None = None) -> Path | None:
    """The checkpoint directory for ``tag`` (default: the one ``latest`` names); None if there is none."""
    load_dir = Path(load_dir)
    if tag is None:
        latest = load_dir / "latest"
        if not latest.exists():
            return None
        tag = latest.read_text().strip()
    path = load_dir / tag
    if not (path / "manifest.json").exists():
        raise CheckpointError(f"checkpoint {path} has no manifest.json: incomplete, or not a moe_parallel checkpoint")
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}/manifest.json has format_version={manifest.get('format_version')!r}; this version reads "
            f"{FORMAT_VERSION}"
        )
    for rel, size in manifest["files"].items():
        file = path / rel
        if not file.exists():
            raise CheckpointError(f"checkpoint {path} is missing {rel} (listed in manifest.json)")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {file} has {file.stat().st_size} bytes, manifest says {size}")
    return manifest


def load_checkpoint(
    engine, load_dir: str | os.PathLike, tag: str | None = None, load_optimizer: bool = True
) -> dict[str, Any] | None:
    """Load a checkpoint saved at any layout into ``engine``; returns its client state (None: nothing to load).

    Strict: a parameter missing from the checkpoint or present there but not in the model, a
    missing expert shard, or a shape mismatch is a :class:`CheckpointError`.
    """
    path = resolve_checkpoint(load_dir, tag)
    if path is None:
        return None
    manifest = read_manifest(path)
    model = engine.module
    step = int(manifest["step"])

    dense: dict[str, dict[str, Tensor]] = {}
    for rel in manifest["files"]:
        if rel.startswith("dense/"):
            dense.update(torch.load(path / rel, map_location="cpu", weights_only=True))
    _check_experts_listed(model, manifest, path)

    names = canonical_names(model)
    experts = _expert_params(model)
    model_dense = {names[n] for n, p in model.named_parameters() if id(p) not in experts}
    all_dense_in_model = _all_dense_names_across_stages(model_dense)
    extra = sorted(set(dense) - all_dense_in_model)
    missing = sorted(model_dense - set(dense))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:10]}{'...' if len(missing) > 10 else ''}"
            f", unexpected {extra[:10]}{'...' if len(extra) > 10 else ''}"
        )

    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    optimizer_step = trainer.get("optimizer_step") or step
    masters = _masters(engine)
    if load_optimizer:
        _link_flat_optimizer_states(engine, create_at_step=optimizer_step)
    expert_cache: dict[tuple[int, int], dict] = {}
    for local_name, param in model.named_parameters():
        if id(param) in experts:
            layer, named = experts[id(param)]
            short = next(n for n, p in named.items() if p is param)
            slices = []
            for j in range(layer.num_local_experts):
                key = (layer.layer_number, layer.experts.first_expert_id + j)
                if key not in expert_cache:
                    file = path / "experts" / f"layer_{key[0]}" / f"expert_{key[1]}.pt"
                    expert_cache[key] = torch.load(file, map_location="cpu", weights_only=True)
                slices.append(expert_cache[key][short])
            entry = {k: torch.stack([s[k] for s in slices]) for k in slices[0]}
        else:
            entry = dense[names[local_name]]
        if entry["param"].shape != param.shape:
            raise CheckpointError(
                f"{local_name}: checkpoint shape {tuple(entry['param'].shape)} != model shape {tuple(param.shape)}"
            )
        master = masters.get(id(param))
        _set_param(param, entry["param"], master)
        if load_optimizer:
            optim_state = {k: entry[k] for k in OPTIM_KEYS if k in entry}
            _set_optim_state(engine, param, optim_state, optimizer_step, master)
    if load_optimizer:
        _set_optimizer_step(engine, optimizer_step)

    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
        # load_state_dict restores the schedule's position, not the rate the optimizer uses next.
        if hasattr(scheduler, "get_last_lr"):
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
    engine.global_steps = trainer["step"]
    engine.global_samples = trainer["global_samples"]
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = path / "rng" / f"rank_{rank}.pt"
    if manifest["saved_world_size"] == world and rng_file.exists():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    _barrier()
    return trainer["client_state"]


def _all_dense_names_across_stages(local: set[str]) -> set[str]:
    if not dist.is_initialized():
        return set(local)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(local))
    return set().union(*map(set, gathered))


def _check_experts_listed(model: nn.Module, manifest: dict[str, Any], path: Path) -> None:
    saved = _expert_ids_by_layer(manifest["files"])
    for layer in numbered_moe_layers(model):
        ids = saved.get(layer.layer_number)
        if ids is None:
            raise CheckpointError(f"checkpoint {path} has no experts for MoE layer {layer.layer_number}")
        if ids != list(range(layer.num_experts)):
            raise CheckpointError(
                f"checkpoint {path}: MoE layer {layer.layer_number} has experts {ids[:4]}..{ids[-4:]} "
                f"({len(ids)}), the model expects {layer.num_experts}; missing "
                f"{sorted(set(range(layer.num_experts)) - set(ids))[:8]}"
            )


# ---------------------------------------------------------------- offline conversion (no processes, no model)


def export_consolidated(checkpoint: str | os.PathLike, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Plain weights of a checkpoint as one state dict of canonical names (experts stacked by global id).

    This is the state dict of the model built at PP=1, EP=1; optimizer state is left out.
    """
    path = Path(checkpoint)
    manifest = read_manifest(path)
    state: dict[str, Tensor] = {}
    for rel in manifest["files"]:
        if rel.startswith("dense/"):
            for name, entry in torch.load(path / rel, map_location="cpu", weights_only=True).items():
                state.setdefault(name, entry["param"].to(dtype))
    for layer, ids in _expert_ids_by_layer(manifest["files"]).items():
        per_expert = [
            torch.load(path / "experts" / f"layer_{layer}" / f"expert_{i}.pt", map_location="cpu", weights_only=True)
            for i in ids
        ]
        for short, canonical in manifest["expert_parameters"][str(layer)].items():
            state[canonical] = torch.stack([e[short]["param"] for e in per_expert]).to(dtype)
    return state


def import_consolidated(
    state: dict[str, Tensor], expert_parameters: dict[str, dict[str, str]], out_dir: str | os.PathLike, tag: str
) -> Path:
    """Write a consolidated state dict as a topology-free checkpoint (weights only, step 0).

    ``expert_parameters``: {layer number: {"w1": canonical name, ...}} naming the stacked expert
    parameters (the ``expert_parameters`` of any manifest of the same model).
    """
    out = Path(out_dir)
    staging = out / f"{tag}.tmp-{uuid.uuid4().hex[:8]}"
    (staging / "dense").mkdir(parents=True)
    stacked = {canonical for names in expert_parameters.values() for canonical in names.values()}
    missing = sorted(stacked - set(state))
    if missing:
        raise CheckpointError(f"the state dict lacks expert parameters {missing[:8]}")
    _atomic_torch_save(
        {n: {"param": t.float()} for n, t in state.items() if n not in stacked}, staging / "dense" / "stage_0.pt"
    )
    for layer, names in expert_parameters.items():
        folder = staging / "experts" / f"layer_{layer}"
        folder.mkdir(parents=True)
        num_experts = {state[c].shape[0] for c in names.values()}
        if len(num_experts) != 1:
            raise CheckpointError(f"layer {layer}: stacked expert parameters disagree on the expert count")
        for i in range(num_experts.pop()):
            _atomic_torch_save({s: {"param": state[c][i].float()} for s, c in names.items()}, folder / f"expert_{i}.pt")
    _atomic_torch_save({"step": 0, "global_samples": 0, "scheduler": None, "client_state": {}}, staging / "trainer.pt")
    (staging / "manifest.json").write_text(json.dumps(_manifest(staging, 0, 0, expert_parameters), indent=1))
    final = out / tag
    if final.exists():
        raise CheckpointError(f"{final} exists; choose another --tag")
    os.replace(staging, final)
    (out / "latest").write_text(tag)
    return final
