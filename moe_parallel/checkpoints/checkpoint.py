"""Topology-free checkpoints: experts under global ids, loadable at any PP / EP / DP layout.

Layout of one checkpoint (``<dir>/<tag>/``)::

    manifest.json                      format, step, layers, experts, files (bytes and CRC-32 each), lineage
    dense/stage_<s>.pt                 {canonical name: {"param", "exp_avg", "exp_avg_sq"}}
    dense/stage_0/<name>.pt            the same, one parameter per file (imports, written tensor by tensor)
    buffers/stage_<s>.pt               {canonical name: tensor} of the stage's persistent buffers (router bias)
    experts/layer_<L>/expert_<id>.pt   {"w1": {"param", "exp_avg", ...}, "w2": ...} of one expert
    trainer.pt                         step, scheduler, client state (data position, W&B run id, ...)
    rng/rank_<r>.pt                    RNG states (restored when the world size is unchanged)

Every tensor is the full value (ZeRO partitions are gathered with DeepSpeed's ``safe_get_full_*``
helpers), so loading is a matter of picking the slices a rank owns. A save stores fp32; an import
stores its source's dtype (bf16 for a bf16 model), which a load converts to the parameter's dtype
and to the optimizer's fp32 master weights (bf16 values widen to fp32 exactly). A save is
atomic: files go to ``<tag>.tmp-<id>/``, which rank 0 renames to ``<tag>`` after every rank has
finished, and only then points ``latest`` at it. A save that fails on any rank (a full disk, an
I/O error) fails on every rank with the same error, and its staging directory is removed: the
previous checkpoint and ``latest`` stay as they were. A load checks every file it reads against
its checksum and fails on every rank when one rank finds a fault. The files, manifests, resume
selection and rotation live in :mod:`.checkpoint_store`.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.comm import broadcast_from_rank0
from ..core.layer import MoELayer, moe_layers
from ..integration import deepspeed as ds_integration
from .store import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointInfo,
    ResumeChoice,
    check_resume_step,
    clear_dead_staging,
    clear_interrupted,
    describe_os_error,
    earlier_checkpoint_hint,
    inspect_checkpoint,
    lineage,
    list_checkpoints,
    load_file,
    owned_staging,
    read_latest,
    read_manifest,
    remove_tree,
    resolve_checkpoint,
    rotate_checkpoints,
    select_resume,
    staging_name,
    step_tag,
    sync_dir,
    verify_checkpoint,
    write_file,
    write_latest,
    write_manifest,
)

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "ResumeChoice",
    "check_resume_step",
    "clear_interrupted",
    "export_consolidated",
    "import_consolidated",
    "list_checkpoints",
    "load_checkpoint",
    "read_manifest",
    "resolve_checkpoint",
    "rotate_checkpoints",
    "save_checkpoint",
    "select_resume",
    "verify_checkpoint",
]

OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------- where this rank sits


@dataclass
class _Placement:
    rank: int
    world_size: int
    stage_id: int
    dense_writer: bool  # data-parallel rank 0 of its stage
    expert_writer: bool  # expert-data-parallel rank 0 (one copy of each expert is written)


def _placement(engine) -> _Placement:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    stage_id = getattr(engine, "stage_id", 0)
    if not dist.is_initialized():
        return _Placement(rank, world, stage_id, True, True)
    mpu = getattr(engine, "mpu", None)
    dp_rank = mpu.get_data_parallel_rank() if mpu is not None else ds_integration.data_parallel_rank()
    layers = numbered_moe_layers(engine.module)
    edp_rank = ds_integration.expert_data_parallel_rank(layers[0].expert_group_name) if layers else dp_rank
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


def persistent_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Local name -> buffer, for the buffers in the model's state dict (RoPE caches are not)."""
    # By type, not by name: a tied parameter appears in the state dict under a second name.
    return {name: t for name, t in model.state_dict(keep_vars=True).items() if not isinstance(t, nn.Parameter)}


def canonical_buffer_names(model: nn.Module, names: dict[str, str] | None = None) -> dict[str, str]:
    """Local name -> layout-independent name of each persistent buffer (a model may define
    ``canonical_buffer_names``).

    Otherwise derived from the parameters' renaming (``names``): a pipeline renames module paths
    (``3.ffn.router`` -> ``blocks.1.ffn.router``), never a tensor's own name, so a buffer takes the
    new path of the nearest module above it that holds a parameter.
    """
    if hasattr(model, "canonical_buffer_names"):
        return model.canonical_buffer_names()
    if not hasattr(model, "canonical_parameter_names"):
        return {name: name for name in persistent_buffers(model)}  # the plain model's names already
    names = canonical_names(model) if names is None else names
    modules: dict[str, str] = {}  # local module path -> canonical module path
    for local, canonical in names.items():
        lp, cp = local.split("."), canonical.split(".")
        while lp and cp and lp[-1] == cp[-1]:  # strip the unchanged tail: each step is an enclosing module
            lp, cp = lp[:-1], cp[:-1]
            if lp or not cp:  # the root maps only to the root
                modules.setdefault(".".join(lp), ".".join(cp))
    out = {}
    for local in persistent_buffers(model):
        parts = local.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            path = ".".join(parts[:cut])
            if path in modules:
                out[local] = ".".join(p for p in (modules[path], *parts[cut:]) if p)
                break
        else:
            raise CheckpointError(
                f"no canonical name for buffer {local}: no module above it holds a parameter; give the model "
                "a canonical_buffer_names() method"
            )
    return out


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
    if _is_zero_mapped(param):
        return ds_integration.full_fp32_param(param).float().cpu().clone()
    return (param if master is None else master).detach().float().cpu().clone()


def _full_optim_state(engine, param: Tensor, master: Tensor | None) -> dict[str, Tensor]:
    if _is_zero_mapped(param):
        return {k: ds_integration.full_optimizer_state(param, k).float().cpu().clone() for k in OPTIM_KEYS}
    state = _inner_state(engine).get(param if master is None else master, {})
    return {k: state[k].float().cpu().clone() for k in OPTIM_KEYS if k in state}


def _set_param(param: Tensor, value: Tensor, master: Tensor | None) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))
        if master is not None:
            master.copy_(value.to(master.dtype))
    if _is_zero_mapped(param):
        ds_integration.set_full_fp32_param(param, value.to(param.device, torch.float32))


def _set_optim_state(engine, param: Tensor, state: dict[str, Tensor], step: int, master: Tensor | None) -> None:
    if not state:
        return
    if _is_zero_mapped(param):
        for k in OPTIM_KEYS:
            ds_integration.set_full_optimizer_state(param, state[k].to(param.device, torch.float32), k)
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
            ds_integration.link_optimizer_state(lp_params, flat, inner_state)


def _set_optimizer_step(engine, step: int) -> None:
    """Adam's bias correction uses ``step``; ZeRO keeps it on its flat partitions."""
    for group_state in _inner_state(engine).values():
        if "step" in group_state:
            old = group_state["step"]
            group_state["step"] = torch.full_like(old, float(step)) if isinstance(old, Tensor) else step


# ---------------------------------------------------------------- agreement between ranks


def _agree(error: str | None, payload: Any = None) -> list[Any]:
    """Every rank's ``payload``, once all ranks have reported; if any rank failed, the same
    :class:`CheckpointError` on every rank.

    Collective: each rank reaches it with its own outcome, so a fault seen by one rank (its file,
    its disk) cannot leave the others waiting in a later collective.
    """
    if dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (error, payload))
    else:
        gathered = [(error, payload)]
    failed = [(rank, err) for rank, (err, _) in enumerate(gathered) if err is not None]
    if failed:
        rank, first = failed[0]
        where = f"rank {rank}: " if len(gathered) > 1 else ""
        more = f" (and {len(failed) - 1} more rank{'s' if len(failed) > 2 else ''})" if len(failed) > 1 else ""
        raise CheckpointError(f"{where}{first}{more}")
    return [p for _, p in gathered]


# ---------------------------------------------------------------- save


def save_checkpoint(
    engine,
    save_dir: str | os.PathLike,
    tag: str | None = None,
    client_state: dict[str, Any] | None = None,
    *,
    parent: str | os.PathLike | None = None,
    trained_cleanly: bool | None = None,
) -> Path:
    """Save model, optimizer, scheduler, RNG and ``client_state``; every rank must call it.

    Returns the checkpoint's directory. ``tag`` defaults to ``step_<global_steps>``. ``parent`` and
    ``trained_cleanly`` record the lineage that rotation uses to keep a known-good checkpoint (see
    :func:`.checkpoint_store.lineage`). A tag that already holds a checkpoint of this step or a
    later one is not replaced: that is a :class:`CheckpointError`, as is a failed write on any rank
    ("no space left on <dir>" for a full disk); either way nothing that was saved before changes.
    """
    save_dir = Path(save_dir)
    step = int(getattr(engine, "global_steps", 0))
    tag = tag or step_tag(step)
    place = _placement(engine)
    staging = save_dir / broadcast_from_rank0(staging_name(tag))
    try:
        _save(engine, place, save_dir, staging, tag, step, client_state, (parent, trained_cleanly))
    except CheckpointError as err:
        if place.rank == 0:
            remove_tree(staging)
        raise CheckpointError(f"checkpoint of step {step} not saved: {err}. {_previous(save_dir)}") from None
    return save_dir / tag


def _previous(save_dir: Path) -> str:
    try:
        latest = read_latest(save_dir)
    except CheckpointError as err:
        return f"Nothing else was changed ({err})."
    if latest is None:
        return "No earlier checkpoint exists."
    return f"{save_dir / latest} is unchanged and still the latest checkpoint."


def _save(engine, place, save_dir, staging, tag, step, client_state, parentage) -> None:
    error = None
    if place.rank == 0:
        try:
            _refuse_to_replace(save_dir / tag, step)
            for sub in ("dense", "buffers", "experts", "rng"):
                (staging / sub).mkdir(parents=True, exist_ok=True)
        except CheckpointError as err:
            error = str(err)
        except OSError as err:
            error = describe_os_error(err, save_dir)
    model = engine.module
    names = canonical_names(model)
    buffer_names: dict[str, str] = {}
    try:
        buffer_names = canonical_buffer_names(model, names)
    except CheckpointError as err:
        error = error or str(err)
    _agree(error)

    _link_flat_optimizer_states(engine)
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

    files: dict[str, Any] = {}
    buffers = {n: b.detach().cpu().clone() for n, b in persistent_buffers(model).items()}
    if place.dense_writer:
        files[f"dense/stage_{place.stage_id}.pt"] = dense
        # Replicated on every rank of the stage (router biases move by all-reduced loads): one copy.
        files[f"buffers/stage_{place.stage_id}.pt"] = {buffer_names[n]: b for n, b in buffers.items()}
    if place.expert_writer:
        for (layer_number, expert_id), state in expert_files.items():
            files[f"experts/layer_{layer_number}/expert_{expert_id}.pt"] = state
    files[f"rng/rank_{place.rank}.pt"] = _rng_state()
    if place.rank == 0:
        scheduler = getattr(engine, "lr_scheduler", None)
        files["trainer.pt"] = {
            "step": step,
            "global_samples": int(getattr(engine, "global_samples", 0)),
            "optimizer_step": _optimizer_step_count(engine),  # may differ from `step` (warm-up steps)
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "client_state": client_state or {},
        }
    written, error = _write_files(files, staging, save_dir)
    # One exchange: every rank's outcome, its files' checksums, and the MoE layers of every stage.
    gathered = _agree(error, (written, _expert_param_names(model, names), sorted(buffer_names.values())))

    error = None
    if place.rank == 0:
        entries = {rel: entry for part, _, _ in gathered for rel, entry in part.items()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "saved_world_size": place.world_size,
            "moe_layers": {str(k): v for k, v in _expert_ids_by_layer(entries).items()},
            "expert_parameters": dict(
                sorted({k: v for _, part, _ in gathered for k, v in part.items()}.items(), key=lambda kv: int(kv[0]))
            ),
            # Every persistent buffer's canonical name: a load finds each of them or fails naming it.
            "buffers": sorted({n for _, _, part in gathered for n in part}),
            "files": dict(sorted(entries.items())),
        }
        try:
            manifest.update(lineage(save_dir, *parentage))
            _publish(staging, save_dir, tag, step, manifest)
        except CheckpointError as err:
            error = str(err)
        except OSError as err:
            error = describe_os_error(err, save_dir, save_dir / tag)
    # Rank 0 alone published; every rank learns how that went before returning.
    error = broadcast_from_rank0(error)
    if error is not None:
        raise CheckpointError(error)


def _write_files(files: dict[str, Any], staging: Path, save_dir: Path) -> tuple[dict[str, Any], str | None]:
    """Write this rank's files into the staging directory: ({rel: manifest entry}, error or None)."""
    written = {}
    for rel, obj in files.items():
        path = staging / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            written[rel] = write_file(obj, path)
        except OSError as err:
            return written, describe_os_error(err, save_dir, path)
        except Exception as err:  # reported to every rank like an I/O error: none may be left waiting
            return written, f"cannot save {path}: {type(err).__name__}: {err}"
    return written, None


def _refuse_to_replace(final: Path, step: int) -> None:
    """A tag may be re-used for a later step (a rolling tag), never to replace this step or a newer one."""
    if not final.exists():
        return
    existing = inspect_checkpoint(final)
    if existing.complete and existing.step < step:
        return
    held = (
        f"a checkpoint of step {existing.step}"
        if existing.complete
        else f"an incomplete checkpoint ({existing.problem})"
    )
    raise CheckpointError(
        f"{final} already holds {held}; saving step {step} there would destroy it. A run resumed from an "
        f"older checkpoint must not overwrite newer ones: continue from {final} (train.resume={final}), or move "
        f"it out of {final.parent}"
    )


def _publish(staging: Path, save_dir: Path, tag: str, step: int, manifest: dict[str, Any]) -> None:
    """Rank 0, once every file is written: manifest, rename into place, point ``latest`` at it."""
    write_manifest(staging, manifest)
    sync_dir(staging)
    final = save_dir / tag
    old = None
    if final.exists():  # a rolling tag of an older step (checked by _refuse_to_replace)
        _refuse_to_replace(final, step)
        old = save_dir / staging_name(f"{tag}.replaced")
        os.replace(final, old)
    os.replace(staging, final)
    try:
        sync_dir(save_dir)
        write_latest(save_dir, tag)
    except BaseException:
        # Undo, so that a failed save changes nothing: `latest` still names the previous checkpoint.
        os.replace(final, staging)
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        remove_tree(old)


def _expert_param_names(model: nn.Module, names: dict[str, str]) -> dict[str, dict[str, str]]:
    """{layer number: {"w1": canonical name of the stacked parameter, ...}} of this rank's stage."""
    local_names = {id(p): names[n] for n, p in model.named_parameters()}
    return {
        str(layer.layer_number): {short: local_names[id(p)] for short, p in layer.experts.named_parameters()}
        for layer in numbered_moe_layers(model)
    }


_EXPERT_FILE = re.compile(r"experts/layer_(\d+)/expert_(\d+)\.pt")


def _expert_ids_by_layer(files) -> dict[int, list[int]]:
    """{layer number: sorted global expert ids} from ``experts/layer_<L>/expert_<id>.pt`` paths."""
    layers: dict[int, list[int]] = {}
    for path in files:
        match = _EXPERT_FILE.fullmatch(path)
        if match:
            layers.setdefault(int(match.group(1)), []).append(int(match.group(2)))
    return {layer: sorted(ids) for layer, ids in sorted(layers.items())}


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain data (NumPy's key as an int64 tensor)."""
    state = {
        "python": random.getstate(),
        "numpy": numpy_rng_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def numpy_rng_state(legacy: tuple) -> dict[str, Any]:
    """NumPy's legacy global state ``('MT19937', key, pos, has_gauss, cached_gaussian)`` as plain data."""
    name, key, pos, has_gauss, cached = legacy
    return {
        "bit_generator": str(name),
        "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    key = numpy["key"].numpy().astype(np.uint32)
    np.random.set_state((numpy["bit_generator"], key, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- load


def load_checkpoint(
    engine, load_dir: str | os.PathLike, tag: str | None = None, load_optimizer: bool = True
) -> dict[str, Any] | None:
    """Load a checkpoint saved at any layout into ``engine``; returns its client state (None: nothing to load).

    ``load_dir``: a checkpoints folder (``tag``, default the one ``latest`` names) or one checkpoint.
    Every rank checks each file it reads against the manifest's checksum first. Strict: a corrupt
    or missing file, a parameter or persistent buffer missing from the checkpoint or present there
    but not in the model, a missing expert shard or a shape mismatch is a :class:`CheckpointError`,
    raised on every rank, before the model is changed. A checkpoint of an earlier format,
    whose manifest lists no buffers, loads with a warning naming the buffers that keep their current values.
    """
    model = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    path = None
    error = None
    try:
        buffer_names = canonical_buffer_names(model)
        path = resolve_checkpoint(load_dir, tag)
        if path is not None:
            files = _read_rank_files(model, path, rank, world)
    except (CheckpointError, OSError) as err:
        error = str(err)
        if path is not None:
            error += ". " + earlier_checkpoint_hint(path.parent, inspect_checkpoint(path))
    found = _agree(error, path is not None)
    if not any(found):
        return None
    if not all(found):
        raise CheckpointError(
            f"{load_dir}: some ranks find a checkpoint to load and others do not (not a shared filesystem?)"
        )
    manifest, dense, saved_buffers, expert_state, trainer, rng = files

    names = canonical_names(model)
    experts = _expert_params(model)
    model_dense = {names[n] for n, p in model.named_parameters() if id(p) not in experts}
    all_dense_in_model, all_buffers_in_model = _names_across_stages(model_dense, set(buffer_names.values()))
    extra = sorted(set(dense) - all_dense_in_model)
    missing = sorted(model_dense - set(dense))
    has_buffers = "buffers" in manifest  # absent: saved before checkpoints held buffers
    if has_buffers:
        listed = set(manifest["buffers"])
        extra += sorted((set(saved_buffers) | listed) - all_buffers_in_model)
        missing += sorted(n for n in buffer_names.values() if n not in saved_buffers)
    error = None
    if missing or extra:
        error = (
            f"checkpoint {path} does not match the model: missing {missing[:10]}{'...' if len(missing) > 10 else ''}"
            f", unexpected {extra[:10]}{'...' if len(extra) > 10 else ''}"
        )
    elif not has_buffers and buffer_names and rank == 0:
        warnings.warn(
            f"checkpoint {path} predates buffers in checkpoints: {sorted(all_buffers_in_model)} keep their "
            "current values (the initial ones in a new run; a router's trained expert_bias is lost)",
            stacklevel=2,
        )
    for local_name, canonical in buffer_names.items():
        buf = persistent_buffers(model)[local_name]
        if canonical in saved_buffers and saved_buffers[canonical].shape != buf.shape and error is None:
            error = (
                f"buffer {canonical}: checkpoint shape {tuple(saved_buffers[canonical].shape)} != model shape "
                f"{tuple(buf.shape)}"
            )
    entries = {}
    for local_name, param in model.named_parameters():
        if id(param) in experts:
            layer, named = experts[id(param)]
            short = next(n for n, p in named.items() if p is param)
            slices = [
                expert_state[(layer.layer_number, layer.experts.first_expert_id + j)][short]
                for j in range(layer.num_local_experts)
            ]
            entry = {k: torch.stack([s[k] for s in slices]) for k in slices[0]}
        elif names[local_name] in dense:
            entry = dense[names[local_name]]
        else:
            continue  # reported as missing above
        if entry["param"].shape != param.shape and error is None:
            error = f"{local_name}: checkpoint shape {tuple(entry['param'].shape)} != model shape {tuple(param.shape)}"
        entries[local_name] = entry
    _agree(error)  # nothing has been changed yet

    step = int(manifest["step"])
    optimizer_step = trainer.get("optimizer_step") or step
    masters = _masters(engine)
    if load_optimizer:
        _link_flat_optimizer_states(engine, create_at_step=optimizer_step)
    for local_name, param in model.named_parameters():
        entry = entries[local_name]
        master = masters.get(id(param))
        _set_param(param, entry["param"], master)
        if load_optimizer:
            optim_state = {k: entry[k] for k in OPTIM_KEYS if k in entry}
            _set_optim_state(engine, param, optim_state, optimizer_step, master)
    if load_optimizer:
        _set_optimizer_step(engine, optimizer_step)
    with torch.no_grad():
        for local_name, buf in persistent_buffers(model).items():
            if buffer_names[local_name] in saved_buffers:
                buf.copy_(saved_buffers[buffer_names[local_name]].to(buf.dtype))

    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
        # load_state_dict restores the schedule's position, not the rate the optimizer uses next.
        if hasattr(scheduler, "get_last_lr"):
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
    engine.global_steps = trainer["step"]
    engine.global_samples = trainer["global_samples"]
    if rng is not None:
        _set_rng_state(rng)
    _barrier()
    return trainer["client_state"]


def _read_rank_files(model: nn.Module, path: Path, rank: int, world: int):
    """Everything this rank needs from the checkpoint, each file checked against its checksum:
    (manifest, dense entries of every stage, buffers of every stage, {(layer, expert id): state} of
    its experts, trainer, rng)."""
    manifest = read_manifest(path)
    _check_experts_listed(model, manifest, path)
    dense: dict[str, dict[str, Tensor]] = {}
    buffers: dict[str, Tensor] = {}
    for rel in manifest["files"]:
        if rel.startswith("dense/"):
            dense.update(load_file(path, rel, manifest))
        elif rel.startswith("buffers/"):
            buffers.update(load_file(path, rel, manifest))
    expert_state = {}
    for layer in numbered_moe_layers(model):
        for j in range(layer.num_local_experts):
            key = (layer.layer_number, layer.experts.first_expert_id + j)
            expert_state[key] = load_file(path, f"experts/layer_{key[0]}/expert_{key[1]}.pt", manifest)
    trainer = load_file(path, "trainer.pt", manifest)
    rng_file = f"rng/rank_{rank}.pt"
    rng = None
    if manifest["saved_world_size"] == world and rng_file in manifest["files"]:
        rng = load_file(path, rng_file, manifest)
    return manifest, dense, buffers, expert_state, trainer, rng


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _names_across_stages(dense: set[str], buffers: set[str]) -> tuple[set[str], set[str]]:
    """The union over every rank (so every stage) of the dense parameter and buffer names."""
    if not dist.is_initialized():
        return set(dense), set(buffers)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (sorted(dense), sorted(buffers)))
    return set().union(*(set(d) for d, _ in gathered)), set().union(*(set(b) for _, b in gathered))


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

    This is the state dict of the model built at PP=1, EP=1, persistent buffers included (kept in
    their saved dtype: the router's float32 bias would lose its small updates in bf16); optimizer
    state is left out. Every file is checked against its checksum: a corrupt checkpoint is a
    :class:`CheckpointError` naming the file.
    """
    path = Path(checkpoint)
    manifest = read_manifest(path)
    state: dict[str, Tensor] = {}
    for rel in manifest["files"]:
        if rel.startswith("dense/"):
            for name, entry in load_file(path, rel, manifest).items():
                state.setdefault(name, entry["param"].to(dtype))
        elif rel.startswith("buffers/"):
            for name, tensor in load_file(path, rel, manifest).items():
                state.setdefault(name, tensor)
    missing = sorted(set(manifest.get("buffers", ())) - set(state))
    if missing:
        raise CheckpointError(f"checkpoint {path}: manifest.json lists buffers {missing[:8]} that no file holds")
    for layer, ids in _expert_ids_by_layer(manifest["files"]).items():
        per_expert = [load_file(path, f"experts/layer_{layer}/expert_{i}.pt", manifest) for i in ids]
        for short, canonical in manifest["expert_parameters"][str(layer)].items():
            state[canonical] = torch.stack([e[short]["param"] for e in per_expert]).to(dtype)
    return state


class ConsolidatedReader:
    """The plain weights of a checkpoint (as :func:`export_consolidated` gives them), one tensor or
    one expert at a time, for writers that stream.

    Each file is checked against its checksum the first time it is read and then memory-mapped; a
    file stays mapped (its pages count as this process's memory once touched) until :meth:`forget`,
    which a caller calls after each piece of output.
    """

    def __init__(self, checkpoint: str | os.PathLike) -> None:
        self.path = Path(checkpoint)
        self.manifest = read_manifest(self.path)
        self.expert_parameters: dict[str, dict[str, str]] = self.manifest["expert_parameters"]
        self.expert_ids = _expert_ids_by_layer(self.manifest["files"])
        self._checked: set[str] = set()
        self._open: dict[str, Any] = {}
        self.file_of: dict[str, str] = {}  # dense parameter or buffer -> the file holding it
        self.shapes: dict[str, tuple[int, ...]] = {}
        for rel in self.manifest["files"]:
            if rel.startswith(("dense/", "buffers/")):
                for name, value in self._load(rel).items():
                    self.file_of.setdefault(name, rel)
                    self.shapes.setdefault(name, tuple(_param(value).shape))
        self.forget()
        missing = sorted(set(self.manifest.get("buffers", ())) - set(self.file_of))
        if missing:
            raise CheckpointError(
                f"checkpoint {self.path}: manifest.json lists buffers {missing[:8]} that no file holds"
            )

    def _load(self, rel: str) -> Any:
        if rel not in self._open:
            self._open[rel] = load_file(self.path, rel, self.manifest, mmap=True, check=rel not in self._checked)
            self._checked.add(rel)
        return self._open[rel]

    def names(self) -> set[str]:
        """Every tensor of the consolidated state: dense parameters, buffers, stacked expert parameters."""
        stacked = {c for layer in self.expert_parameters.values() for c in layer.values()}
        return set(self.file_of) | stacked

    def tensor(self, name: str) -> Tensor:
        """A dense parameter or buffer in its stored dtype (mapped: copy it to keep it past :meth:`forget`)."""
        return _param(self._load(self.file_of[name])[name])

    def expert(self, layer: int, expert_id: int) -> dict[str, Tensor]:
        """{"w1": tensor, "w2": tensor} of one expert of MoE layer ``layer``, stored dtype."""
        state = self._load(f"experts/layer_{layer}/expert_{expert_id}.pt")
        return {short: entry["param"] for short, entry in state.items()}

    def forget(self) -> None:
        """Unmap every file read so far (they are not checked again when read again)."""
        self._open.clear()


def _param(value: Any) -> Tensor:
    """A dense file holds {"param", optimizer state}; a buffer file holds the tensor itself."""
    return value["param"] if isinstance(value, dict) else value


def _fp32(t: Tensor) -> Tensor:
    return (t.float() if t.is_floating_point() else t).detach().cpu().clone()


def import_consolidated(
    state: dict[str, Tensor],
    expert_parameters: dict[str, dict[str, str]],
    out_dir: str | os.PathLike,
    tag: str,
    buffers: list[str] | tuple[str, ...] = (),
) -> Path:
    """Write a consolidated state dict as a topology-free checkpoint (weights only, step 0, fp32).

    ``expert_parameters``: {layer number: {"w1": canonical name, ...}} naming the stacked expert
    parameters (the ``expert_parameters`` of any manifest of the same model). ``buffers``: the keys
    of ``state`` that are persistent buffers, not parameters (the ``buffers`` of such a manifest).
    """
    out = Path(out_dir)
    final = out / tag
    if final.exists():
        raise CheckpointError(f"{final} exists; choose another --tag")
    stacked = {canonical for names in expert_parameters.values() for canonical in names.values()}
    missing = sorted((stacked | set(buffers)) - set(state))
    if missing:
        raise CheckpointError(f"the state dict lacks expert parameters or buffers {missing[:8]}")
    clear_dead_staging(final)  # an import of this tag killed earlier on this host
    staging = owned_staging(final)
    try:
        staging.mkdir(parents=True)
        writer = CheckpointWriter(staging)
        for name, tensor in state.items():
            if name not in stacked and name not in set(buffers):
                writer.dense(name, tensor.float())
        writer.buffers({n: _fp32(state[n]) for n in buffers})
        for layer, names in expert_parameters.items():
            num_experts = {state[c].shape[0] for c in names.values()}
            if len(num_experts) != 1:
                raise CheckpointError(f"layer {layer}: stacked expert parameters disagree on the expert count")
            for i in range(num_experts.pop()):
                writer.expert(int(layer), i, {s: state[c][i].float() for s, c in names.items()})
        _publish(staging, out, tag, 0, writer.finish(expert_parameters, buffers))
    except OSError as err:
        remove_tree(staging)
        raise CheckpointError(describe_os_error(err, out)) from err
    except CheckpointError:
        remove_tree(staging)
        raise
    return final


class FileJournal(Protocol):
    """Where a :class:`CheckpointWriter` learns which files an earlier run finished, and records its own."""

    def entry(self, rel: str) -> dict[str, Any] | None: ...
    def record(self, rel: str, entry: dict[str, Any]) -> None: ...


class _NoJournal:
    def entry(self, rel: str) -> dict[str, Any] | None:
        return None

    def record(self, rel: str, entry: dict[str, Any]) -> None:
        pass


def dense_file(name: str) -> str:
    """The file of one dense parameter in a checkpoint written tensor by tensor (loads read any
    number of ``dense/`` files, so this layout and a save's one file per stage load alike)."""
    return f"dense/stage_0/{name}.pt"


def expert_file(layer: int, expert_id: int) -> str:
    return f"experts/layer_{layer}/expert_{expert_id}.pt"


BUFFERS_FILE = "buffers/stage_0.pt"


class CheckpointWriter:
    """Writes a weights-only topology-free checkpoint (step 0) into ``directory`` one file at a time,
    as tensors are produced, and its manifest at the end: memory holds one file's tensors at a time.

    Tensors are stored in the dtype given (a load converts them to the parameter's dtype). With a
    ``journal``, a file an earlier run finished is not written again, and each new file is recorded
    once it is on disk.
    """

    def __init__(self, directory: Path, journal: FileJournal | None = None, prefix: str = "") -> None:
        self.directory = Path(directory)
        self.journal = journal if journal is not None else _NoJournal()
        self.prefix = prefix  # the directory's path inside the journal's tree
        self.files: dict[str, dict[str, Any]] = {}

    def finished(self, rel: str) -> bool:
        """Whether ``rel`` is on disk from an earlier run (then it is taken into the manifest as it is)."""
        entry = self.journal.entry(self.prefix + rel)
        if entry is not None:
            self.files[rel] = entry
        return entry is not None

    def write(self, rel: str, obj: Any) -> None:
        path = self.directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = write_file(obj, path)
        self.files[rel] = entry
        self.journal.record(self.prefix + rel, entry)

    def dense(self, name: str, tensor: Tensor) -> None:
        self.write(dense_file(name), {name: {"param": tensor}})

    def expert(self, layer: int, expert_id: int, tensors: dict[str, Tensor]) -> None:
        self.write(expert_file(layer, expert_id), {short: {"param": t} for short, t in tensors.items()})

    def buffers(self, tensors: dict[str, Tensor]) -> None:
        self.write(BUFFERS_FILE, tensors)

    def finish(self, expert_parameters: dict[str, dict[str, str]], buffers: list[str] | tuple[str, ...]) -> dict:
        """Write ``trainer.pt`` (step 0, no optimizer, no data position); return the manifest to publish."""
        self.write("trainer.pt", {"step": 0, "global_samples": 0, "scheduler": None, "client_state": {}})
        return {
            "format_version": FORMAT_VERSION,
            "step": 0,
            "saved_world_size": 0,
            "moe_layers": {str(k): v for k, v in _expert_ids_by_layer(self.files).items()},
            "expert_parameters": dict(sorted(expert_parameters.items(), key=lambda kv: int(kv[0]))),
            "buffers": sorted(buffers),
            "files": dict(sorted(self.files.items())),
            **lineage(self.directory, None, None),
        }
