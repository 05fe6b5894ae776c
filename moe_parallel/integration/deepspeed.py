"""DeepSpeed's primitives as moe_parallel uses them, importing DeepSpeed only when called.

- :func:`init_distributed`: torch.distributed started through ``deepspeed.init_distributed``.
- :func:`expert_group_name`: the name DeepSpeed files an expert-parallel group under.
- :func:`mark_as_deepspeed_moe`: DeepSpeed's engine finds MoE layers with ``isinstance(module,
  deepspeed.moe.layer.MoE)`` (and then keeps expert parameters in their own ZeRO groups, reduces them
  over the expert-data-parallel group and saves them per expert). Our layers are plain ``nn.Module``s
  (so that ``import moe_parallel`` does not pull in DeepSpeed); a layer is given DeepSpeed's class as
  an extra base the moment DeepSpeed is loaded: at construction if it already is, else by
  :func:`moe_parallel.integration.engine.build_engine` or by the DeepSpeed drop-in. None of DeepSpeed's MoE code
  runs: our methods come first in the MRO.
- :func:`register_expert_groups`, :func:`deepspeed_expert_group`, :func:`check_expert_groups`,
  :func:`data_parallel_rank`, :func:`expert_data_parallel_rank`: the process groups in
  ``deepspeed.utils.groups``.
- :func:`full_fp32_param`, :func:`full_optimizer_state`, :func:`set_full_fp32_param`,
  :func:`set_full_optimizer_state`, :func:`link_optimizer_state`: whole values of ZeRO-partitioned
  parameters and their Adam states (what topology-free checkpoints read and write).
- :func:`use_topology_free_checkpoints`: ``engine.save_checkpoint`` / ``load_checkpoint`` routed to
  :mod:`moe_parallel.checkpoints.checkpoint` (for engines built by ``build_engine``).
- :func:`unlink_shm_allreduce_buffers`: the ``/dev/shm`` files DeepSpeed's CPU communication leaves
  behind, removed once every rank has mapped them.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from torch import Tensor, nn

from ..core.comm import ProcessGroup


def init_distributed(backend: str, timeout: timedelta) -> None:
    """Initialise torch.distributed through ``deepspeed.init_distributed`` (rendezvous from the
    ``RANK``/``WORLD_SIZE``/``MASTER_*`` environment; no MPI discovery), so DeepSpeed's comm wraps it."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)


def expert_group_name(ep_size: int) -> str:
    """The name DeepSpeed files expert groups under (``param.group_name`` of expert parameters)."""
    return f"ep_size_{ep_size}"


def mark_expert_parameters(params: Iterable[nn.Parameter], ep_size: int) -> None:
    """Flag expert parameters as DeepSpeed does (``deepspeed.moe.utils.is_moe_param``): reduced over
    the expert-data-parallel group of ``expert_group_name(ep_size)`` only."""
    name = expert_group_name(ep_size)
    for param in params:
        param.allreduce = False
        param.group_name = name


_RECOGNISED_PREFIX = "DeepSpeedRecognized__"


@functools.cache
def _recognised_class(cls: type) -> type:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    # Filed under a name of this module that encodes `cls`, so that pickle finds it (see __getattr__).
    name = _RECOGNISED_PREFIX + f"{cls.__module__}:{cls.__qualname__}".replace(".", "__dot__").replace(":", "__in__")
    # `cls` first: its methods (forward, set_deepspeed_parallelism, state-dict hooks) shadow DeepSpeed's.
    recognised = type(cls.__name__, (cls, DeepSpeedMoE), {"__module__": __name__, "__qualname__": name})
    globals()[name] = recognised
    return recognised


def __getattr__(name: str) -> type:
    """Unpickling a marked layer in a fresh process: rebuild its class from the encoded name."""
    if not name.startswith(_RECOGNISED_PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module_name, _, qualname = (
        name[len(_RECOGNISED_PREFIX) :].replace("__in__", ":").replace("__dot__", ".").partition(":")
    )
    cls: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return _recognised_class(cls)


def mark_as_deepspeed_moe(module: nn.Module) -> None:
    """Make ``isinstance(module, deepspeed.moe.layer.MoE)`` true (imports DeepSpeed)."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    if not isinstance(module, DeepSpeedMoE):
        module.__class__ = _recognised_class(type(module))


def mark_if_deepspeed_loaded(module: nn.Module) -> None:
    """:func:`mark_as_deepspeed_moe` when DeepSpeed is already imported (never imports it)."""
    if "deepspeed" in sys.modules:
        mark_as_deepspeed_moe(module)


def mark_moe_layers(model: nn.Module) -> None:
    """Mark every MoE layer of ``model`` (before ``deepspeed.initialize`` looks for them)."""
    from ..core.layer import moe_layers

    for layer in moe_layers(model):
        mark_as_deepspeed_moe(layer)


def register_expert_groups(
    ep_size: int,
    ep_group: ProcessGroup,
    ep_ranks: list[int],
    expert_dp_group: ProcessGroup,
    expert_dp_ranks: list[int],
) -> None:
    """File our EP and expert-DP groups in ``deepspeed.utils.groups`` so DeepSpeed reduces experts right."""
    from deepspeed.utils import groups

    name = expert_group_name(ep_size)
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep_ranks
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = expert_dp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = expert_dp_ranks


def check_expert_groups(layer: Any) -> None:
    """``deepspeed.initialize`` on an :class:`MoELayer`: DeepSpeed must reduce its experts over its groups."""
    from deepspeed.utils import groups

    name = layer.expert_group_name
    registered = groups._get_expert_parallel_group_dict()
    if name not in registered:
        if layer.ep_size > 1:
            raise RuntimeError(
                f"expert-parallel group '{name}' is not registered with DeepSpeed: build the groups with "
                "moe_parallel.integration.parallel.initialize_parallel(pp, ep) before creating the model"
            )
        groups._create_expert_and_data_parallel(1)
    elif layer.ep_size > 1 and registered[name] is not layer.ep_group:
        raise RuntimeError(
            f"DeepSpeed's expert-parallel group '{name}' is not the group this layer all-to-alls over: "
            "pass ParallelState.ep_group from moe_parallel.integration.parallel.initialize_parallel to the layer"
        )


def data_parallel_rank() -> int:
    """This rank's index in DeepSpeed's data-parallel group (engines built without an ``mpu``)."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    return dist.get_rank(groups._get_data_parallel_group())


def expert_data_parallel_rank(group_name: str) -> int:
    """This rank's index in the expert-data-parallel group of the expert group ``group_name``."""
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_rank(group_name)


class ExpertGroupError(ValueError):
    """DeepSpeed's expert groups cannot be built for this layer; the message names the fix."""


def deepspeed_expert_group(ep_size: int, use_data_before_expert_parallel_: bool = False) -> ProcessGroup:
    """DeepSpeed's expert-parallel group of size ``ep_size``, created as DeepSpeed's MoE creates it
    when missing (groups registered beforehand, e.g. by ``initialize_parallel``, are reused)."""
    import deepspeed.comm as ds_comm
    import torch.distributed as dist
    from deepspeed.utils import groups
    from deepspeed.utils.bwc import bwc_pipeline_parallel_world_size, bwc_tensor_model_parallel_world_size

    if not ds_comm.is_initialized():
        if not dist.is_initialized():
            raise ExpertGroupError(
                f"MoE(ep_size={ep_size}) needs torch.distributed to create its expert-parallel groups: call "
                "deepspeed.init_distributed() (or deepspeed.initialize) before the first forward, or use ep_size=1"
            )
        # torch.distributed was initialised by the user: let deepspeed.comm wrap it, as deepspeed.initialize would.
        ds_comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    if bwc_tensor_model_parallel_world_size(groups.mpu) > 1:
        raise ExpertGroupError(
            "moe_parallel.compat.MoE does not support tensor-parallel non-expert layers (an mpu with "
            "tensor-parallel size > 1 is registered with DeepSpeed): tokens would be duplicated over the "
            "tensor-parallel ranks; use deepspeed.moe.layer.MoE there"
        )
    world_size = ds_comm.get_world_size()
    stage_size = world_size // bwc_pipeline_parallel_world_size(groups.mpu)
    if stage_size % ep_size != 0:
        raise ExpertGroupError(
            f"MoE(ep_size={ep_size}) does not divide the {stage_size} ranks of a pipeline stage (world size "
            f"{world_size}): choose an ep_size that divides {stage_size}, or change the number of processes"
        )
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_
        )
    return groups._get_expert_parallel_group(name)


def full_fp32_param(param: Tensor) -> Tensor:
    """The whole fp32 master value of a ZeRO-partitioned parameter (a collective over its group)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


def full_optimizer_state(param: Tensor, key: str) -> Tensor:
    """The whole optimizer state ``key`` (``exp_avg``, ...) of a ZeRO-partitioned parameter (a collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    return safe_get_full_optimizer_state(param, key)


def set_full_fp32_param(param: Tensor, value: Tensor) -> None:
    """Write this rank's partition of a ZeRO-partitioned parameter's fp32 master value from its whole ``value``."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value)


def set_full_optimizer_state(param: Tensor, value: Tensor, key: str) -> None:
    """Write this rank's partition of optimizer state ``key`` of a ZeRO-partitioned parameter."""
    from deepspeed.utils import safe_set_full_optimizer_state

    safe_set_full_optimizer_state(param, value, key)


def link_optimizer_state(lp_params: list[Tensor], flat: Tensor, optimizer_state: dict) -> None:
    """Point the fragment mappings of one ZeRO/bf16 parameter group (``lp_params``, flat fp32
    partition ``flat``) at their optimizer state, as DeepSpeed does lazily for the first group only."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    lazy_init_hp_params_optimizer_state(lp_params, flat, optimizer_state)


def use_topology_free_checkpoints(engine: Any) -> None:
    """Route ``engine.save_checkpoint`` / ``load_checkpoint`` to :mod:`moe_parallel.checkpoints.checkpoint`.

    DeepSpeed's own MoE checkpointing expects its per-expert module names and cannot store stacked
    experts; ours stores them under global ids and loads at any layout. Same call signatures.
    """
    from ..checkpoints.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint

    def save(save_dir, tag=None, client_state=None, save_latest=True, exclude_frozen_parameters=False):
        return save_checkpoint(engine, save_dir, tag=tag, client_state=client_state)

    def load(load_dir, tag=None, load_module_strict=True, load_optimizer_states=True, **_ignored):
        path = resolve_checkpoint(load_dir, tag)
        client_state = load_checkpoint(engine, load_dir, tag=tag, load_optimizer=load_optimizer_states)
        return (None if path is None else str(path)), client_state

    engine.save_checkpoint = save
    engine.load_checkpoint = load


SHM_DIR = "/dev/shm"


def shm_allreduce_buffer(rank: int) -> str:
    """The ``/dev/shm`` file of ``rank``'s all-reduce buffer in DeepSpeed's CPU communication
    (``deepspeed/ops/csrc/cpu/comm/shm.cpp``: named by user, ``MASTER_ADDR``, ``MASTER_PORT`` and rank)."""
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"
    return os.path.join(SHM_DIR, name)


def unlink_shm_allreduce_buffers() -> bool:
    """Remove this rank's DeepSpeed shared-memory all-reduce file once every rank has mapped it.

    On CPU with every rank on one host, ``deepspeed.init_distributed`` creates a ~70 MB file per rank in
    ``/dev/shm`` (RAM) and never unlinks it: every run leaves its files behind until ``/dev/shm``
    fills the memory of the box. The mappings outlive the name, so the run is unaffected and the memory
    returns when its processes exit. Collective: every rank of the world group calls it after
    ``init_distributed``. Returns whether a file was removed.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return False
    if dist.get_world_size() > 1:
        dist.barrier()  # every rank has finished init_distributed: each has opened every other rank's file
    try:
        os.unlink(shm_allreduce_buffer(dist.get_rank()))
    except FileNotFoundError:  # DeepSpeed's shm path not in use (ranks on several hosts, or no DeepSpeed)
        return False
    return True
