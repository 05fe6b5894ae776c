"""A training layout's per-rank memory, communication and step time, and the search over layouts.

:func:`plan_layout` puts together what the other modules of this package measure on the meta
device: model states as DeepSpeed's ZeRO holds them (``states``), the bytes saved for backward per
micro-batch (``activations``) and the bytes the collectives move (``comm``), for every pipeline
stage (the ranks of a stage hold the same shapes). :func:`search` enumerates the layouts DeepSpeed
accepts on a cluster, drops those that do not fit, and ranks the rest by an estimated step time.

What is estimated, not measured, is stated where it is used: the step time (compute at a fraction
of peak, collectives at given bandwidths, the 1F1B bubble) and the per-device reserve (CUDA context,
NCCL and allocator slack), which no meta-device build can see.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..integration.engine import optimizer_param_groups
from ..integration.parallel import ParallelConfigError, ParallelLayout, divisors
from .activations import UnitActivations
from .comm import predict_comm
from .model import ModelConfig, StageModel, build_stage, is_expert_param
from .states import StateBytes, predict_state_bytes

GiB = 1024**3

# The memory components of a rank, in the order tables and pictures show them.
COMPONENTS = (
    "parameters",
    "gradients",
    "master weights",
    "optimizer states",
    "activations",
    "logits",
    "comm buffers",
    "reserve",
)


class PlanError(ValueError):
    """A layout or cluster description that cannot be planned; the message names the field and the fix."""


@dataclass(frozen=True)
class Layout:
    """How a job splits the model and the batch: world = ``pp * dp``; ``ep`` divides ``dp``."""

    pp: int = 1
    dp: int = 1
    ep: int = 1
    zero_stage: int = 1
    micro_batch: int = 1
    grad_accum: int = 1
    activation_checkpointing: bool = False

    @property
    def world_size(self) -> int:
        return self.pp * self.dp

    @property
    def expert_dp(self) -> int:
        return self.dp // self.ep

    def check(self, config: ModelConfig) -> None:
        """Refuse what DeepSpeed or the layout arithmetic refuses, naming the setting."""
        num_experts = config.moe.num_experts if config.moe else None
        try:
            ParallelLayout(self.world_size, self.pp, self.ep, num_experts)
        except ParallelConfigError as err:
            raise PlanError(str(err)) from None
        if self.pp > config.num_layers:
            raise PlanError(
                f"parallel.pp={self.pp} exceeds the model's {config.num_layers} blocks: one stage needs one"
            )
        if self.zero_stage not in (0, 1, 2):
            raise PlanError(f"deepspeed.zero_stage={self.zero_stage}: choose 0, 1 or 2 (3 cannot hold experts)")
        if self.zero_stage == 2 and self.pp > 1:
            raise PlanError(
                "deepspeed.zero_stage=2 with parallel.pp > 1: DeepSpeed's pipeline engine refuses it; use 0 or 1"
            )
        for name in ("micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name}={getattr(self, name)} must be >= 1")

    def describe(self) -> str:
        ckpt = " ckpt" if self.activation_checkpointing else ""
        return (
            f"pp {self.pp} dp {self.dp} ep {self.ep} zero {self.zero_stage} "
            f"mb {self.micro_batch} x ga {self.grad_accum}{ckpt}"
        )


@dataclass(frozen=True)
class Workload:
    """What a step computes: sequence length, precision and the DeepSpeed settings that size buffers."""

    seq_len: int
    precision: str = "bf16"  # fp32 | bf16, as deepspeed.precision resolves
    attention: str = "flash"  # the attention backend whose saved tensors count (flash on GPUs, math on CPUs)
    weight_decay: float = 0.1
    ds_config: dict | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


@dataclass(frozen=True)
class Cluster:
    """The machines a job runs on. Speeds are stated assumptions of the step-time estimate:
    the defaults describe an H100 SXM node (989 TFLOP/s dense bf16, NVLink about 450 GB/s per
    direction, one 400 Gb/s NIC per GPU) at 40% of peak."""

    gpus: int
    gpu_memory: int  # bytes per device
    gpus_per_node: int = 8
    peak_flops: float = 989e12
    mfu: float = 0.4  # the fraction of peak the compute reaches
    intra_node_bandwidth: float = 450e9  # bytes/s per GPU inside a node
    inter_node_bandwidth: float = 50e9  # bytes/s per GPU across nodes
    reserve: int = 2 * GiB  # CUDA context, NCCL and the allocator's slack, per device
    margin: float = 0.10  # a layout fits when its peak stays under (1 - margin) of gpu_memory

    @property
    def usable_memory(self) -> float:
        return self.gpu_memory * (1.0 - self.margin)


@dataclass
class StagePlan:
    """One pipeline stage (every rank of it holds the same shapes)."""

    stage: int
    memory: dict[str, int]  # component -> bytes, in COMPONENTS order
    comm: object  # comm.CommBytes
    forward_flops: float  # one micro-batch's forward on one rank
    inflight_micro_batches: int
    activations: object  # activations.ActivationBytes of one micro-batch

    @property
    def total(self) -> int:
        return sum(self.memory.values())

    def largest(self) -> str:
        return max((k for k in self.memory if k != "reserve"), key=self.memory.__getitem__)


@dataclass
class LayoutPlan:
    config: ModelConfig
    layout: Layout
    workload: Workload
    stages: list[StagePlan]
    step_time: dict[str, float] = field(default_factory=dict)  # seconds: compute, all-to-all, ..., total

    @property
    def peak(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    def fits(self, cluster: Cluster) -> bool:
        return self.peak.total <= cluster.usable_memory


# ---------------------------------------------------------------- one layout


class Planner:
    """Plans layouts of one model. Stages that hold the same blocks (the middle stages of a deep
    pipeline, say) are planned once: model states, traffic and activations are cached by what a
    stage holds, and activations are summed from blocks traced once each (``UnitActivations``)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.units = UnitActivations(config)
        self._stages: dict[tuple, StageModel] = {}
        self._states: dict[tuple, object] = {}
        self._comm: dict[tuple, object] = {}

    def stage(self, pp: int, stage: int, ep: int) -> StageModel:
        key = (pp, stage, ep)
        if key not in self._stages:
            self._stages[key] = build_stage(self.config, pp, stage, ep)
        return self._stages[key]

    def holds(self, pp: int, stage: int) -> tuple:
        """What stage ``stage`` of ``pp`` holds: its blocks' signatures (equal for equal stages)."""
        return tuple(self.units.signature(u) for u in self.units.units_in(pp, stage))

    def states(self, layout: Layout, workload: Workload, stage: int, dp_rank: int) -> StateBytes:
        """Model-state bytes of data-parallel rank ``dp_rank`` of ``stage`` (ZeRO partitions differ by rank)."""
        return predict_state_bytes(
            self.stage(layout.pp, stage, layout.ep),
            dp=layout.dp,
            ep=layout.ep,
            zero_stage=layout.zero_stage,
            precision=workload.precision,
            weight_decay=workload.weight_decay,
            ds_config=workload.ds_config,
            dp_rank=dp_rank,
        )

    def check_groups_agree(self, layout: Layout, workload: Workload) -> None:
        """Refuse what ``build_engine`` refuses before it would hang: under ZeRO 1/2, or bf16 at ZeRO 0
        in a pipeline, DeepSpeed's gradient norm makes one collective per optimizer group, so every
        stage needs the same groups (a stage without MoE layers has fewer)."""
        if layout.pp == 1 or (layout.zero_stage == 0 and workload.precision != "bf16"):
            return
        kinds = {
            tuple(g.get("name", "") for g in optimizer_param_groups(self.stage(layout.pp, s, layout.ep).module, 0.1))
            for s in range(layout.pp)
        }
        if len(kinds) > 1:
            setting = f"deepspeed.zero_stage={layout.zero_stage}" + (" with bf16" if layout.zero_stage == 0 else "")
            raise PlanError(
                f"parallel.pp={layout.pp} gives the stages different optimizer param groups (a stage without MoE "
                "layers, or expert parameters that DeepSpeed splits into another number of groups), which "
                f"{setting} cannot train (DeepSpeed's gradient norm would hang; build_engine refuses it): "
                "choose another parallel.pp, or ZeRO 0 in fp32"
            )

    def plan(self, layout: Layout, workload: Workload, cluster: Cluster | None = None) -> LayoutPlan:
        """Per-stage memory and communication of ``layout`` (and its step time on ``cluster``)."""
        layout.check(self.config)
        self.check_groups_agree(layout, workload)
        checkpointed = layout.activation_checkpointing and layout.pp > 1  # the app checkpoints pipeline blocks
        ds_key = json.dumps(workload.ds_config, sort_keys=True, default=str)
        stages = []
        for s in range(layout.pp):
            holds = self.holds(layout.pp, s)
            key = (holds, layout.ep, layout.dp, layout.zero_stage, workload.precision, workload.weight_decay, ds_key)
            if key not in self._states:
                self._states[key] = max(
                    (self.states(layout, workload, s, r) for r in _ranks_to_plan(layout.dp)), key=lambda b: b.total
                )
            states = self._states[key]
            acts = self.units.stage(
                num_stages=layout.pp,
                stage=s,
                micro_batch=layout.micro_batch,
                seq_len=workload.seq_len,
                ep=layout.ep,
                dtype=workload.dtype,
                attention=workload.attention,
            )
            # DeepSpeed's 1F1B keeps the forwards of up to (stages - stage) micro-batches awaiting backward
            # (one on the last stage, the only one with logits: those it saves are counted there).
            inflight = min(layout.pp - s, layout.grad_accum)
            per_mb = (acts.saved_checkpointed if checkpointed else acts.saved) - acts.logits_saved
            saved = per_mb * inflight + (acts.recompute if checkpointed else 0)
            memory = {
                "parameters": states.params,
                "gradients": states.grads,
                "master weights": states.master,
                "optimizer states": states.optimizer,
                "activations": saved,
                "logits": acts.logits,
                "comm buffers": states.buffers,
                "reserve": cluster.reserve if cluster is not None else 0,
            }
            comm_key = (
                holds,
                layout.pp,
                layout.ep,
                layout.dp,
                layout.zero_stage,
                layout.micro_batch,
                layout.grad_accum,
                workload.seq_len,
                workload.dtype,
                ds_key,
            )
            if comm_key not in self._comm:
                self._comm[comm_key] = predict_comm(
                    self.config,
                    num_stages=layout.pp,
                    stage=s,
                    ep=layout.ep,
                    dp=layout.dp,
                    zero_stage=layout.zero_stage,
                    micro_batch=layout.micro_batch,
                    seq_len=workload.seq_len,
                    grad_accum=layout.grad_accum,
                    dtype=workload.dtype,
                    ds_config=workload.ds_config,
                    stage_model=self.stage(layout.pp, s, layout.ep),
                )
            stages.append(StagePlan(s, memory, self._comm[comm_key], acts.forward_flops, inflight, acts))
        plan = LayoutPlan(self.config, layout, workload, stages)
        if cluster is not None:
            plan.step_time = step_time(plan, cluster)
        return plan

    def expert_heavy(self, layout: Layout) -> bool:
        """Whether expert parameters are most of what some stage holds (then EP is the lever)."""
        for s in range(layout.pp):
            params = list(self.stage(layout.pp, s, layout.ep).module.parameters())
            if sum(p.numel() for p in params if is_expert_param(p)) * 2 > sum(p.numel() for p in params):
                return True
        return False


def _ranks_to_plan(dp: int) -> list[int]:
    """The data-parallel ranks whose model states a plan computes, keeping the busiest: under ZeRO 1
    the gradients a rank holds at the end of backward depend on where its partition falls. Every
    rank of a small group; of a large one the first two, the middle and the last (the one whose
    partition holds the padding)."""
    return list(range(dp)) if dp <= 16 else sorted({0, 1, dp // 2, dp - 1})


def plan_layout(config: ModelConfig, layout: Layout, workload: Workload, cluster: Cluster | None = None) -> LayoutPlan:
    """Per-stage memory and communication of ``layout`` (see :meth:`Planner.plan`)."""
    return Planner(config).plan(layout, workload, cluster)


# ---------------------------------------------------------------- step time (an estimate)


def _ring_factor(n: int) -> float:
    return 2.0 * (n - 1) / n if n > 1 else 0.0


def _bandwidth(cluster: Cluster, span: int) -> float:
    """Per-GPU bandwidth of a group of ``span`` consecutive ranks (inside a node when it fits one)."""
    return cluster.intra_node_bandwidth if span <= cluster.gpus_per_node else cluster.inter_node_bandwidth


def step_time(plan: LayoutPlan, cluster: Cluster) -> dict[str, float]:
    """Seconds per step of the slowest stage: compute (forward, backward at twice the forward, and a
    recompute with checkpointing) at ``cluster.mfu`` of peak; the token all-to-alls (their bytes that
    leave the rank) and the stage-to-stage sends on the critical path; the 1F1B bubble; after the last
    micro-batch, the gradient reductions (ring all-reduce) and ZeRO's all-gather of updated parameters.
    A group of consecutive ranks that fits a node runs at the node's bandwidth, else the network's."""
    lay = plan.layout
    m = lay.grad_accum
    passes = 4.0 if lay.activation_checkpointing and lay.pp > 1 else 3.0
    worst: dict[str, float] = {}
    for st in plan.stages:
        c = st.comm
        compute = passes * st.forward_flops * m / (cluster.peak_flops * cluster.mfu)
        a2a = c.alltoall_remote_bytes / _bandwidth(cluster, lay.ep)
        # Stages are dp ranks apart: the next stage is on the same node only if a node spans both.
        p2p = c.p2p_bytes / _bandwidth(cluster, 2 * lay.dp) if lay.pp > 1 else 0.0
        dp_bw = _bandwidth(cluster, lay.dp)  # an expert-DP group strides by ep over the same ranks
        reduce = (
            _ring_factor(lay.dp) * c.dp_grad_bytes
            + _ring_factor(lay.expert_dp) * c.expert_dp_grad_bytes
            + (lay.dp - 1) * c.dp_param_gather_bytes
            + (lay.expert_dp - 1) * c.expert_dp_param_gather_bytes
        ) / dp_bw + c.tied_grad_bytes / _bandwidth(cluster, lay.world_size)
        per_mb = (compute + a2a + p2p) / m
        total = per_mb * (m + lay.pp - 1) + reduce
        if total > worst.get("total", -1.0):
            worst = {
                "compute": compute,
                "all-to-all": a2a,
                "pipeline sends": p2p,
                "bubble": per_mb * (lay.pp - 1),
                "gradient sync": reduce,
                "total": total,
            }
    return worst


# ---------------------------------------------------------------- search


def candidate_layouts(
    config: ModelConfig,
    gpus: int,
    global_batch: int,
    *,
    micro_batches: Iterable[int] = (1, 2, 4, 8, 16),
    zero_stages: Iterable[int] = (0, 1, 2),
    max_pp: int | None = None,
) -> list[Layout]:
    """Every layout DeepSpeed accepts for ``gpus`` devices and ``global_batch`` sequences per step:
    pp divides the world (at most one stage per block), ep divides dp and the expert count, no
    ZeRO-2 with a pipeline, micro-batch x grad_accum x dp = global_batch, activation checkpointing
    only where the app applies it (pp > 1)."""
    num_experts = config.moe.num_experts if config.moe else 1
    out = []
    for pp in divisors(gpus):
        if pp > config.num_layers or (max_pp is not None and pp > max_pp):
            continue
        dp = gpus // pp
        for ep, zero, mb in itertools.product(divisors(dp), zero_stages, micro_batches):
            if num_experts % ep or (zero == 2 and pp > 1) or global_batch % (mb * dp):
                continue
            for ckpt in (False, True) if pp > 1 else (False,):
                out.append(Layout(pp, dp, ep, zero, mb, global_batch // (mb * dp), ckpt))
    return out


@dataclass
class SearchResult:
    fitting: list[LayoutPlan]  # best first
    rejected: list[tuple[Layout, str]]  # what does not fit, and why (the component that overflows)
    nearest: LayoutPlan | None = None  # of those planned and not fitting, the one with the smallest peak


def _by_micro_batch(layout: Layout) -> tuple:
    return (layout.pp, layout.ep, layout.zero_stage, layout.activation_checkpointing, layout.micro_batch)


def search(config: ModelConfig, workload: Workload, cluster: Cluster, global_batch: int, **candidates) -> SearchResult:
    """Plan every candidate layout; keep those whose peak rank fits ``cluster.usable_memory``,
    ranked by estimated step time (ties: less peak memory first)."""
    planner = Planner(config)
    fitting, rejected = [], []
    nearest = None
    too_big: dict[tuple, int] = {}  # the smallest micro-batch that did not fit, per layout otherwise alike
    for layout in sorted(candidate_layouts(config, cluster.gpus, global_batch, **candidates), key=_by_micro_batch):
        alike = (layout.pp, layout.ep, layout.zero_stage, layout.activation_checkpointing)
        if alike in too_big:  # memory only grows with the micro-batch (activations, logits)
            rejected.append(
                (layout, f"needs more than micro-batch {too_big[alike]} of the same layout, which does not fit")
            )
            continue
        try:
            plan = planner.plan(layout, workload, cluster)
        except PlanError as err:  # a layout DeepSpeed cannot train
            rejected.append((layout, str(err)))
            continue
        if plan.fits(cluster):
            fitting.append(plan)
        else:
            too_big[alike] = layout.micro_batch
            rejected.append((layout, overflow_message(plan, cluster, planner)))
            if nearest is None or plan.peak.total < nearest.peak.total:
                nearest = plan
    fitting.sort(key=lambda p: (p.step_time["total"], p.peak.total))
    return SearchResult(fitting, rejected, nearest)


# ---------------------------------------------------------------- refusal


def overflow_message(plan: LayoutPlan, cluster: Cluster, planner: Planner | None = None) -> str:
    """Why ``plan`` does not fit: the stage, its largest component, and the cheapest fix."""
    peak = plan.peak
    component = peak.largest()
    return (
        f"stage {peak.stage} needs {peak.total / GiB:.1f} GiB per rank (with a {peak.memory['reserve'] / GiB:.1f} GiB "
        f"reserve for CUDA and NCCL), over the {cluster.usable_memory / GiB:.1f} GiB "
        f"usable of {cluster.gpu_memory / GiB:.1f} GiB ({cluster.margin:.0%} margin); the largest part is "
        f"{component} ({peak.memory[component] / GiB:.1f} GiB): {cheapest_fix(plan, component, planner)}"
    )


def cheapest_fix(plan: LayoutPlan, component: str, planner: Planner | None = None) -> str:
    """The change that shrinks ``component`` without adding devices, where one exists."""
    lay = plan.layout
    if component == "comm buffers":  # DeepSpeed's gradient buckets: reduce_bucket_size elements each
        stage = lay.zero_stage
        return (
            "lower DeepSpeed's zero_optimization.reduce_bucket_size (default 5e8 elements per bucket), e.g. "
            f"'+deepspeed.extra.zero_optimization={{stage: {stage}, reduce_bucket_size: 50000000}}' "
            "(deepspeed.extra replaces the whole zero_optimization entry: keep the stage in it)"
        )
    if component in ("activations", "logits"):
        if lay.pp > 1 and not lay.activation_checkpointing:
            return "turn on deepspeed.activation_checkpointing=true"
        if lay.micro_batch > 1:
            return (
                f"lower train.micro_batch_size to {lay.micro_batch // 2} (and raise train.grad_accum to keep the batch)"
            )
        return "shorten data.seq_len, or add pipeline stages (parallel.pp)"
    if component in ("optimizer states", "master weights", "gradients") and lay.zero_stage < (2 if lay.pp == 1 else 1):
        return f"raise deepspeed.zero_stage to {2 if lay.pp == 1 else 1} (shards them over data-parallel ranks)"
    if lay.ep < lay.dp and (planner or Planner(plan.config)).expert_heavy(lay):
        return f"raise parallel.ep above {lay.ep} (each rank holds fewer experts)"
    return f"add pipeline stages (parallel.pp above {lay.pp}) or devices"
