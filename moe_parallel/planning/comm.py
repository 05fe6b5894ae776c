"""What one rank sends in a training step, predicted from the meta-device stage: the token
all-to-alls, the counts exchange, the gradient reductions of DeepSpeed 0.19.8 at ZeRO 0, 1 and 2,
the ZeRO all-gather of updated parameters, the pipeline's point-to-point transfers, and the 1F1B bubble.

Per MoE layer and micro-batch at EP > 1 a rank makes five all-to-alls (the layer's dispatcher,
``core/dispatcher.py``): the counts exchange (``[EP, e + 1]`` int64, forward only), the dispatch
of its own kept rows, the combine that returns the rows it received, and their backwards, which
send the same row counts the other way. So a rank sends its own kept rows twice (dispatch forward,
combine backward) and the rows it received twice (combine forward, dispatch backward), and it
receives exactly as much as it sends. Combine weights never travel (``input_weighted`` scales the
rows before they leave: the same bytes).

Rows a rank sends (T = micro_batch * seq_len tokens, K = top_k, E experts, C =
``expert_capacity(T, K, E, capacity_factor, min_capacity)``):

- with a capacity factor: at most ``min(E * C, T * K)`` own rows; it receives at most C rows per
  local expert from each of EP ranks, ``min(E * C, EP * T * K)`` in all. The prediction is that
  bound, exact when every expert fills its capacity on every rank (then every rank sends C rows to
  each expert, receives ``E * C``, and the share ``(EP - 1) / EP`` of its rows leaves it exactly);
- dropless: exactly ``T * K`` own rows. What it receives depends on the routing: ``T * K`` in
  expectation under balance (and summed over the EP group, exactly ``EP * T * K``), at most
  ``EP * T * K``.

Byte counts of the all-to-alls include the chunk a rank sends to itself; ``alltoall_remote_share``
is the part that leaves it (``count_collectives`` counts that part). Gradient and parameter bytes
are the payloads DeepSpeed hands its collectives over groups of more than one rank (a one-rank group
moves nothing): the gradient tensors each all-reduce reduces (at ZeRO 0 the engine's bucketed
all-reduce; at ZeRO 1 and 2, with DeepSpeed's default ``reduce_scatter`` and multi-rank bucket
all-reduce, the same whole gradients, once per step at ZeRO 1 and once per micro-batch at ZeRO 2),
and the partition each rank contributes to the all-gather of updated parameters at ZeRO 1 and 2
(and at ZeRO 0 with bf16 under the pipeline engine, whose ``BF16_Optimizer`` partitions likewise).
Weights tied across pipeline stages have their gradients all-reduced once more, over those stages.
Not predicted (refused): ZeRO's ``parameter_alignment``. With multi-token prediction modules the
numbers are an estimate: their MoE layers count as blocks, and only hidden states count between stages.

Shape suffixes: T tokens per micro-batch per rank, K top_k, E experts, e = E / EP local experts,
C capacity per expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.capacity import expert_capacity
from ..core.layer import moe_layers
from ..integration.engine import optimizer_param_groups
from .model import ModelConfig, StageModel, build_stage, dtype_bytes, is_expert_param, pipeline_family
from .states import NCCL_START_ALIGNMENT_FACTOR, aligned_numel

COUNTS_DTYPE_BYTES = 8  # the counts exchange sends int64


@dataclass(frozen=True)
class CommBytes:
    """What one rank sends in one training step (every micro-batch, forward and backward).

    ``alltoall_bytes``: the token all-to-alls' payload (own chunk included); with a capacity factor
    the capacity bound (exact when every expert fills), dropless the balanced expectation.
    ``alltoall_dispatch_bytes``: its part made of the rank's own rows (dispatch forward, combine
    backward): exact dropless, the capacity bound otherwise. ``alltoall_bound``: the most the token
    all-to-alls can send, and the most they can deliver to the rank. ``alltoall_remote_share``: the
    part of ``alltoall_bytes`` and ``counts_exchange_bytes`` that leaves the rank when balanced.
    ``alltoall_calls``: all-to-all collectives, counts exchanges included.
    ``dp_grad_bytes`` / ``expert_dp_grad_bytes``: gradient payload reduced over DP / expert-DP.
    ``dp_param_gather_bytes`` / ``expert_dp_param_gather_bytes``: the partition this rank gives the
    all-gather of updated parameters (ZeRO 1 and 2) over DP / expert-DP.
    ``tied_grad_bytes``: gradients of weights tied across pipeline stages (the embedding and a tied
    LM head), all-reduced over the stages that hold them.
    ``p2p_bytes``: the hidden states ``[micro_batch, seq_len, hidden]`` sent to the next stage plus
    their gradients sent to the previous one (the tensor metadata of the first step and the scalar
    loss the last stage reports are not counted).
    ``bubble_fraction``: idle share of DeepSpeed's 1F1B schedule, ``(PP - 1) / (m + PP - 1)``.
    """

    alltoall_bytes: int
    alltoall_dispatch_bytes: int
    alltoall_bound: int
    alltoall_remote_share: float
    # With a capacity: every expert can fill it (E * C <= T * K), and a step that fills them sends
    # exactly alltoall_bytes. Dropless: True, alltoall_dispatch_bytes is exact (alltoall_bytes is the
    # balanced expectation).
    alltoall_exact: bool
    counts_exchange_bytes: int
    alltoall_calls: int
    dp_grad_bytes: int
    expert_dp_grad_bytes: int
    dp_param_gather_bytes: int
    expert_dp_param_gather_bytes: int
    tied_grad_bytes: int
    p2p_bytes: int
    bubble_fraction: float

    @property
    def alltoall_remote_bytes(self) -> float:
        """Token all-to-all bytes that leave the rank (balanced routing)."""
        return self.alltoall_bytes * self.alltoall_remote_share

    @property
    def grad_bytes(self) -> int:
        """Every gradient byte the step reduces: over DP, expert-DP and the tied stages."""
        return self.dp_grad_bytes + self.expert_dp_grad_bytes + self.tied_grad_bytes


def predict_comm(
    config: ModelConfig,
    *,
    num_stages: int,
    stage: int,
    ep: int,
    dp: int,
    zero_stage: int,
    micro_batch: int,
    seq_len: int,
    grad_accum: int,
    dtype: torch.dtype,
    ds_config: dict[str, Any] | None = None,
    stage_model: StageModel | None = None,
) -> CommBytes:
    """Bytes one rank of pipeline stage ``stage`` sends per training step (see the module docstring).

    ``dp`` is the data-parallel size of a stage (world = PP x DP), ``ep`` divides it; ``grad_accum``
    micro-batches of ``micro_batch`` sequences of ``seq_len`` tokens make a step; ``dtype`` is the
    parameters' and activations' dtype, in which gradients travel too (also with fp32 gradient
    accumulation) unless ``ds_config`` sets DeepSpeed's ``communication_data_type``; ``ds_config``
    is checked for settings whose bytes are not predicted (``zero_optimization.parameter_alignment``).
    ``stage_model``: the stage already built by ``build_stage(config, num_stages, stage, ep)`` (a
    planner reuses it over layouts). With multi-token prediction (DeepSeek-V3's MTP modules) the
    numbers are an estimate: the MTP modules' MoE layers count as blocks, and at PP > 1 only the
    hidden states count between stages.
    """
    if dp % ep:
        raise ValueError(f"ep={ep} must divide dp={dp}")
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage={zero_stage}: MoE layers train at ZeRO 0, 1 or 2")
    if num_stages > 1 and zero_stage == 2:
        raise ValueError("DeepSpeed's pipeline engine runs ZeRO 0 or 1, not 2")
    ds_config = ds_config or {}
    if ds_config.get("zero_optimization", {}).get("parameter_alignment", False):
        raise ValueError("zero_optimization.parameter_alignment=true: its padded partitions are not predicted")
    if stage_model is None:
        stage_model = build_stage(config, num_stages, stage, ep)
    row_bytes_per_dim = dtype_bytes(dtype)
    tokens = micro_batch * seq_len

    sent = dispatch = bound = counts = calls = 0
    exact = getattr(config, "mtp_layers", 0) == 0
    for layer in moe_layers(stage_model.module) if ep > 1 else []:
        cfg = layer.config
        row = cfg.hidden_size * row_bytes_per_dim
        assigned = tokens * cfg.top_k
        capacity = expert_capacity(tokens, cfg.top_k, cfg.num_experts, cfg.capacity_factor, cfg.min_capacity)
        if capacity is None:
            own, received, received_bound = assigned, assigned, ep * assigned
        else:
            own = min(cfg.num_experts * capacity, assigned)
            received_bound = min(cfg.num_experts * capacity, ep * assigned)
            received = received_bound  # the capacity bound is the prediction
            exact = exact and cfg.num_experts * capacity <= assigned
        dispatch += 2 * own * row
        sent += 2 * (own + received) * row
        bound += 2 * (own + received_bound) * row
        counts += ep * (cfg.num_experts // ep + 1) * COUNTS_DTYPE_BYTES
        calls += 5

    grads = _grad_and_gather_bytes(stage_model.module, num_stages, dp, ep, zero_stage, dtype, ds_config)
    dp_grad, expert_grad, dp_gather, expert_gather = grads
    if zero_stage == 2:  # ZeRO 2 reduces in the backward hooks of every micro-batch
        dp_grad, expert_grad = dp_grad * grad_accum, expert_grad * grad_accum

    activation = micro_batch * seq_len * config.hidden_size * row_bytes_per_dim
    p2p = (int(not stage_model.is_last) + int(not stage_model.is_first)) * activation * grad_accum
    return CommBytes(
        alltoall_bytes=sent * grad_accum,
        alltoall_dispatch_bytes=dispatch * grad_accum,
        alltoall_bound=bound * grad_accum,
        alltoall_remote_share=(ep - 1) / ep,
        alltoall_exact=exact,
        counts_exchange_bytes=counts * grad_accum,
        alltoall_calls=calls * grad_accum,
        dp_grad_bytes=dp_grad,
        expert_dp_grad_bytes=expert_grad,
        dp_param_gather_bytes=dp_gather,
        expert_dp_param_gather_bytes=expert_gather,
        tied_grad_bytes=_tied_grad_bytes(config, stage_model, dtype),
        p2p_bytes=p2p,
        bubble_fraction=(num_stages - 1) / (grad_accum + num_stages - 1),
    )


def _grad_and_gather_bytes(
    module: torch.nn.Module,
    num_stages: int,
    dp: int,
    ep: int,
    zero_stage: int,
    dtype: torch.dtype,
    ds_config: dict[str, Any],
) -> tuple[int, int, int, int]:
    """One reduction's gradient bytes over DP and expert-DP, and the all-gather partitions.

    Groups of one rank (DP = 1, or expert-DP = DP / EP = 1) move nothing. The optimizer's states
    are partitioned, and the updated parameters all-gathered, at ZeRO 1 and 2, and at ZeRO 0 with
    bf16 under the pipeline engine (DeepSpeed's ``BF16_Optimizer`` partitions as ZeRO 1 does).
    """
    comm_dtype = ds_config.get("communication_data_type")
    grad_elem = dtype_bytes(_torch_dtype(comm_dtype)) if comm_dtype else dtype_bytes(dtype)
    param_elem = dtype_bytes(dtype)
    expert_dp = dp // ep
    dense = sum(p.numel() for p in module.parameters() if p.requires_grad and not is_expert_param(p))
    expert = sum(p.numel() for p in module.parameters() if p.requires_grad and is_expert_param(p))
    dp_grad = dense * grad_elem if dp > 1 else 0
    expert_grad = expert * grad_elem if expert_dp > 1 else 0
    if zero_stage == 0 and not (dtype == torch.bfloat16 and num_stages > 1):
        return dp_grad, expert_grad, 0, 0
    dp_gather = expert_gather = 0
    for group in optimizer_param_groups(module, weight_decay=0.1):  # the value does not change the groups
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        ranks = expert_dp if group.get("moe", False) else dp
        if ranks == 1:
            continue
        numel = sum(p.numel() for p in params)
        padded = aligned_numel(numel, NCCL_START_ALIGNMENT_FACTOR * ranks)
        if group.get("moe", False):
            expert_gather += padded // ranks * param_elem
        else:
            dp_gather += padded // ranks * param_elem
    return dp_grad, expert_grad, dp_gather, expert_gather


def _tied_grad_bytes(config: ModelConfig, stage_model: StageModel, dtype: torch.dtype) -> int:
    """Bytes of the tied weights' gradients this stage all-reduces with the other stages holding them.

    DeepSpeed's pipeline engine reduces each tied weight (``tied_weight_attr``) once per step over the
    stages that build its ``TiedLayerSpec``, at every ZeRO stage; a key on one stage alone moves nothing.
    """
    if stage_model.num_stages == 1:
        return 0
    tied = pipeline_family(config).tied_weights(config, stage_model.num_stages)
    total = 0
    for key, module in stage_model.module.tied_modules.items():
        owners, attrs = tied[key]
        if len(owners) > 1:
            for attr in attrs:
                total += _getattr_path(module, attr).numel() * dtype_bytes(dtype)
    return total


def _getattr_path(module: torch.nn.Module, path: str) -> torch.Tensor:
    for name in path.split("."):
        module = getattr(module, name)
    return module  # type: ignore[return-value]


def _torch_dtype(name: str) -> torch.dtype:
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in names:
        raise ValueError(f"communication_data_type={name!r}: choose one of {sorted(names)}")
    return names[name]
