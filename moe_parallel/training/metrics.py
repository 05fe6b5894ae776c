"""Per-step MoE routing metrics: collected per micro-batch, reduced over DP and gathered over PP.

:class:`MoEMetricsTracker` reads ``MoELayer.last_stats`` of every MoE layer after each micro-batch
forward, accumulates over the micro-batches of one optimizer step, and :meth:`~MoEMetricsTracker.reduce`
turns that into one flat dict for the logger, identical on every rank::

    tracker = MoEMetricsTracker(model)          # forward hooks on every MoELayer of `model`
    for micro_batch in step_batches:            # or engine.train_batch() (DeepSpeed pipeline)
        loss = model(micro_batch); loss.backward()
    metrics = tracker.reduce(parallel_state)    # every rank of the DP and PP groups calls it
    if rank == 0:
        scalars, expert_load = split_expert_load(metrics)
        run_logger.log(step, scalars, expert_load)

Keys (``n`` is the layer's global ``layer_number``)::

    moe/layer_{n}/balance_loss       mean over micro-batches and DP ranks (1.0 = balanced)
    moe/layer_{n}/z_loss             mean
    moe/layer_{n}/dropped_fraction   mean of the per-micro-batch dropped fraction
    moe/layer_{n}/router_entropy     mean, nats
    moe/layer_{n}/tokens_per_expert  np.ndarray [E], int64: SUM over micro-batches and DP ranks
                                     (routed assignments, before dropping)
    moe/layer_{n}/max_load_ratio     max / mean of tokens_per_expert (1.0 = balanced)
    moe/layer_{n}/min_load_ratio     min / mean (0.0 = an expert received nothing)
    moe/layer_{n}/num_tokens         tokens routed by the layer in the step (sum)
    moe/balance_loss, moe/z_loss, moe/dropped_fraction, moe/router_entropy
                                     mean over layers (one line per run in W&B comparisons)
    moe/max_load_ratio               max over layers

Activation checkpointing runs a layer's forward twice (the recomputation happens inside backward).
The forward hook therefore skips any forward that runs while the autograd engine is executing a
backward pass (``torch._C._current_graph_task_id() != -1``). That is exactly where every
checkpointing flavour recomputes: ``torch.utils.checkpoint`` reentrant and non-reentrant (whose
early stop may even cut the recomputed forward short), and DeepSpeed's activation checkpointing.
Comparing ``torch.is_grad_enabled()`` would only catch the reentrant flavour, whose first pass runs
under ``no_grad``; the non-reentrant one runs both passes with grad enabled. A per-micro-batch
counter would need the trainer to tell the tracker where micro-batches start, which a DeepSpeed
pipeline engine (``train_batch`` runs the whole schedule) does not let it do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.comm import group_size
from ..core.layer import MoELayer, MoEStats, moe_layers
from ..integration.parallel import ParallelState
from .block_compile import compiled_owners

ProcessGroup = dist.ProcessGroup

SCALAR_STATS = ("balance_loss", "z_loss", "dropped_fraction", "router_entropy")
"""Per-layer statistics averaged over micro-batches and data-parallel ranks."""

PREFIX = "moe"


class MoEMetricsError(ValueError):
    """The model's MoE layers cannot be tracked as they are (the message names the fix)."""


def layer_key(layer_number: int, name: str) -> str:
    """The metric key of statistic ``name`` of global layer ``layer_number``: ``moe/layer_{n}/{name}``."""
    return f"{PREFIX}/layer_{layer_number}/{name}"


def in_backward_pass() -> bool:
    """Whether the autograd engine is executing a backward pass on this thread.

    A forward that runs then is an activation-checkpointing recomputation. Returns False when this
    torch build lacks the probe (the tracker then counts recomputations too).
    """
    probe = getattr(torch._C, "_current_graph_task_id", None)
    return probe is not None and probe() != -1


@dataclass
class _LayerAccumulator:
    """Sums over the micro-batches of one step for one layer (tensors stay on the layer's device)."""

    num_experts: int
    count: int = 0
    num_tokens: int = 0
    scalars: Tensor | None = None  # [len(SCALAR_STATS)] float64 sums
    tokens_per_expert: Tensor | None = None  # [E] float64 sums (exact up to 2**53)

    def add(self, stats: MoEStats) -> None:
        with torch.no_grad():
            values = torch.stack([getattr(stats, name).detach().reshape(()).double() for name in SCALAR_STATS])
            tokens = stats.tokens_per_expert.detach().double()
            if tokens.numel() != self.num_experts:
                raise MoEMetricsError(
                    f"MoE stats carry {tokens.numel()} expert counts, the layer has {self.num_experts} experts"
                )
            if self.scalars is None or self.tokens_per_expert is None:
                self.scalars, self.tokens_per_expert = values, tokens.clone()
            else:
                self.scalars += values
                self.tokens_per_expert += tokens
        self.count += 1
        self.num_tokens += int(stats.num_tokens)


class MoEMetricsTracker:
    """Accumulates the routing statistics of a model's MoE layers over one optimizer step.

    Args:
        model: the model (or pipeline stage) whose :class:`MoELayer` modules are tracked. Layers are
            named by their *global* ``layer_number``, which must be unique in the model.
        hooks: True (default) records every layer after each of its training forwards through a
            forward hook, counting activation-checkpointing recomputations once (see the module
            docstring). False: the trainer calls :meth:`record` once after each micro-batch forward.
        track_eval: also record forwards in eval mode (``module.training`` False). Off by default so
            that evaluation in the middle of a step does not mix into the training statistics.

    Every rank of the data-parallel and pipeline groups must call :meth:`reduce` once per step.
    """

    def __init__(self, model: nn.Module | None = None, *, hooks: bool = True, track_eval: bool = False) -> None:
        self.use_hooks = hooks
        self.track_eval = track_eval
        self._layers: dict[int, MoELayer] = {}
        self._acc: dict[int, _LayerAccumulator] = {}
        self._handles: list[Any] = []
        if model is not None:
            self.attach(model)

    @property
    def layer_numbers(self) -> list[int]:
        """Global layer numbers of the tracked MoE layers of this rank, sorted."""
        return sorted(self._layers)

    def attach(self, model: nn.Module) -> None:
        """Track every :class:`MoELayer` in ``model`` (and, with ``hooks``, register the forward hooks).

        A layer inside a compiled block (:func:`~moe_parallel.training.block_compile.compile_blocks`) is hooked
        through that block, whose hooks run eagerly after the compiled forward has set ``last_stats``.
        """
        owners = compiled_owners(model)
        for layer in moe_layers(model):
            number = int(layer.layer_number)
            other = self._layers.get(number)
            if other is layer:
                continue
            if other is not None:
                raise MoEMetricsError(
                    f"two MoE layers have layer_number={number}: metrics are keyed by the global layer "
                    "number, so give every MoE layer a distinct one (MoELayer(..., layer_number=i), or set "
                    "`layer.layer_number = i` on moe_parallel.compat.MoE layers)"
                )
            self._layers[number] = layer
            self._acc[number] = _LayerAccumulator(num_experts=layer.num_experts)
            if self.use_hooks:
                target = owners.get(id(layer), layer)
                self._handles.append(target.register_forward_hook(self._make_hook(number, layer)))

    def detach(self) -> None:
        """Remove the forward hooks (the tracker keeps its layers and can still :meth:`record`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.use_hooks = False

    def _make_hook(self, number: int, layer: MoELayer):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if in_backward_pass() or not (layer.training or self.track_eval):
                return
            stats = layer.last_stats
            if stats is not None:
                self._acc[number].add(stats)

        return hook

    def record(self, model: nn.Module | None = None) -> None:
        """Record ``last_stats`` of every tracked layer once (explicit mode: call after each micro-batch forward).

        ``model`` attaches layers not seen yet. Raises when forward hooks are attached: they already
        record, and recording twice would count each micro-batch twice.
        """
        if self._handles:
            raise RuntimeError(
                "MoEMetricsTracker.record(): forward hooks already record every micro-batch; build the "
                "tracker with hooks=False to record explicitly"
            )
        if model is not None:
            self.attach(model)
        for number, layer in self._layers.items():
            if layer.last_stats is not None:
                self._acc[number].add(layer.last_stats)

    def micro_batches(self, layer_number: int) -> int:
        """Micro-batches recorded for ``layer_number`` since the last :meth:`reduce` / :meth:`reset` (this rank)."""
        return self._acc[layer_number].count

    def reset(self) -> None:
        """Forget what was recorded since the last :meth:`reduce`."""
        for number, layer in self._layers.items():
            self._acc[number] = _LayerAccumulator(num_experts=layer.num_experts)

    def reduce(
        self,
        state: ParallelState | None = None,
        *,
        dp_group: ProcessGroup | None = None,
        pp_group: ProcessGroup | None = None,
        reset: bool = True,
    ) -> dict[str, Any]:
        """Reduce the step's statistics and return them for every layer of the model (see the module docstring).

        Statistics are summed over ``dp_group`` (``state.dp_group``) with one all-reduce: the ranks of a
        DP group hold the same layers. The per-stage results are then exchanged over ``pp_group``
        (``state.pp_group``) with ``all_gather_object``, so every rank, the logging rank 0 included,
        returns every layer. A stage without MoE layers takes part in the gather with an empty dict.
        Without groups (or without ``torch.distributed``) the local values are returned.
        ``reset`` clears the accumulators for the next step.
        """
        if state is not None:
            dp_group = dp_group if dp_group is not None else state.dp_group
            pp_group = pp_group if pp_group is not None else state.pp_group
        numbers = self.layer_numbers
        stage_metrics: dict[str, Any] = {}
        if numbers:
            flat = self._pack(numbers, _collective_device(dp_group))
            if group_size(dp_group) > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=dp_group)
            stage_metrics = self._unpack(numbers, flat.cpu().numpy())
        if group_size(pp_group) > 1:
            gathered: list[Any] = [None] * group_size(pp_group)
            dist.all_gather_object(gathered, stage_metrics, group=pp_group)
            metrics = _merge_stages(gathered)
        else:
            metrics = stage_metrics
        if reset:
            self.reset()
        return _with_layer_summaries(metrics)

    def _pack(self, numbers: list[int], device: torch.device) -> Tensor:
        """[count, num_tokens, *scalar sums, *tokens_per_expert] per layer, concatenated (float64)."""
        parts = []
        for number in numbers:
            acc = self._acc[number]
            head = torch.tensor([acc.count, acc.num_tokens], dtype=torch.float64, device=device)
            if acc.scalars is None or acc.tokens_per_expert is None:
                body = torch.zeros(len(SCALAR_STATS) + acc.num_experts, dtype=torch.float64, device=device)
            else:
                body = torch.cat([acc.scalars.to(device), acc.tokens_per_expert.to(device)])
            parts += [head, body]
        return torch.cat(parts)

    def _unpack(self, numbers: list[int], flat: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {}
        offset = 0
        for number in numbers:
            num_experts = self._acc[number].num_experts
            size = 2 + len(SCALAR_STATS) + num_experts
            row = flat[offset : offset + size]
            offset += size
            count = row[0]
            if count <= 0:  # no rank of the DP group ran this layer in the step
                continue
            for i, name in enumerate(SCALAR_STATS):
                out[layer_key(number, name)] = float(row[2 + i] / count)
            out[layer_key(number, "num_tokens")] = float(row[1])
            out[layer_key(number, "tokens_per_expert")] = np.rint(row[2 + len(SCALAR_STATS) :]).astype(np.int64)
        return out


def _collective_device(group: ProcessGroup | None) -> torch.device:
    """Where the flat statistics are reduced: CUDA for NCCL groups, else the CPU (gloo, or no group)."""
    if group_size(group) > 1 and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _merge_stages(per_stage: list[Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for stage, metrics in enumerate(per_stage):
        for key, value in (metrics or {}).items():
            if key in merged:
                raise MoEMetricsError(
                    f"metric {key!r} comes from two pipeline stages (the second is stage {stage}): MoE layers "
                    "on different stages need distinct global layer_number values"
                )
            merged[key] = value
    return merged


def _layer_of(key: str) -> tuple[int, str] | None:
    """``moe/layer_3/balance_loss`` -> (3, "balance_loss"); None for other keys."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1].startswith("layer_"):
        return None
    try:
        return int(parts[1][len("layer_") :]), parts[2]
    except ValueError:
        return None


def _with_layer_summaries(metrics: dict[str, Any]) -> dict[str, Any]:
    """Add load ratios per layer and the across-layer means, ordered by layer number."""
    layers = sorted({parsed[0] for key in metrics if (parsed := _layer_of(key)) is not None})
    out: dict[str, Any] = {}
    for number in layers:
        for name in (*SCALAR_STATS, "num_tokens", "tokens_per_expert"):
            key = layer_key(number, name)
            if key in metrics:
                out[key] = metrics[key]
        tokens = metrics.get(layer_key(number, "tokens_per_expert"))
        if tokens is not None and len(tokens) and tokens.sum() > 0:
            mean = float(tokens.mean())
            out[layer_key(number, "max_load_ratio")] = float(tokens.max()) / mean
            out[layer_key(number, "min_load_ratio")] = float(tokens.min()) / mean
    for name in SCALAR_STATS:
        values = [out[k] for n in layers if (k := layer_key(n, name)) in out]
        if values:
            out[f"{PREFIX}/{name}"] = float(math.fsum(values) / len(values))
    ratios = [out[k] for n in layers if (k := layer_key(n, "max_load_ratio")) in out]
    if ratios:
        out[f"{PREFIX}/max_load_ratio"] = max(ratios)
    return out


def split_expert_load(metrics: Mapping[str, Any]) -> tuple[dict[str, float], dict[int, np.ndarray]]:
    """Split :meth:`MoEMetricsTracker.reduce`'s dict into scalars and ``{layer_number: tokens_per_expert}``.

    The two halves are what :meth:`launch.wandb_logger.RunLogger.log` takes.
    """
    scalars: dict[str, float] = {}
    loads: dict[int, np.ndarray] = {}
    for key, value in metrics.items():
        parsed = _layer_of(key)
        if parsed is not None and parsed[1] == "tokens_per_expert":
            loads[parsed[0]] = np.asarray(value)
        else:
            scalars[key] = float(value)
    return scalars, loads


# ------------------------------------------------------------------------------ health checks


class NonFiniteProbe:
    """Finds the layer whose output went non-finite first in a step (forward hooks; cheap).

    Hooks every :class:`MoELayer`, every module with a ``layer_number`` (blocks, attention, FFN) and
    every embedding of ``model``; of a compiled block (:func:`~moe_parallel.training.block_compile.compile_blocks`)
    only the block itself, whose hook runs outside the compiled code. Each hook stores one 0-d
    ``isfinite(...).all()`` flag on the output's device, without a host sync; :meth:`first_non_finite`
    reads them in call order only when asked (after a step whose loss is not finite). Forwards that
    run inside backward (activation checkpointing recomputation) are skipped. Call :meth:`start_step`
    before each step::

        probe = NonFiniteProbe(model)
        probe.start_step(); loss = train_step()
        if not math.isfinite(loss):
            print(probe.first_non_finite())   # e.g. "blocks.1.ffn (MoELayer, layer 1)"
    """

    def __init__(self, model: nn.Module) -> None:
        self._flags: list[tuple[str, Tensor]] = []
        self._handles = []
        owners = compiled_owners(model)
        for name, module in model.named_modules():
            if id(module) in owners:  # its hook would run inside a compiled block's graph: the block's reports it
                continue
            kind = type(module).__name__
            if isinstance(module, MoELayer) or hasattr(module, "layer_number") or "Embedding" in kind:
                label = f"{name or '<model>'} ({kind}"
                label += f", layer {module.layer_number})" if hasattr(module, "layer_number") else ")"
                self._handles.append(module.register_forward_hook(self._make_hook(label)))

    def _make_hook(self, label: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, Tensor) and out.is_floating_point() and not in_backward_pass():
                with torch.no_grad():
                    self._flags.append((label, torch.isfinite(out).all()))

        return hook

    def start_step(self) -> None:
        """Forget the previous step's flags."""
        self._flags.clear()

    def first_non_finite(self) -> str | None:
        """The label of the first hooked module (in forward order) whose output held a NaN or inf, or None."""
        for label, finite in self._flags:
            if not bool(finite):
                return label
        return None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass(frozen=True)
class CollapseThresholds:
    """When an MoE layer's load counts as degenerate (any one condition), per step.

    Attributes:
        min_load_fraction: an expert receiving less than this fraction of the mean load is starved.
        max_load_ratio: max / mean tokens per expert above this (1.0 = balanced; at most E / top_k).
        min_entropy: mean per-token router entropy (nats) below this: the router is (near) one-hot.
        window: consecutive degenerate steps before a layer is reported.
    """

    min_load_fraction: float = 0.01
    max_load_ratio: float = 3.0
    min_entropy: float = 0.01
    window: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_load_fraction < 1.0:
            raise MoEMetricsError(f"min_load_fraction={self.min_load_fraction!r} is invalid: must be in [0, 1)")
        if not self.max_load_ratio > 1.0:
            raise MoEMetricsError(f"max_load_ratio={self.max_load_ratio!r} is invalid: must be > 1 (1 = balanced)")
        if not self.min_entropy >= 0.0:
            raise MoEMetricsError(f"min_entropy={self.min_entropy!r} is invalid: must be >= 0 (nats)")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise MoEMetricsError(f"window={self.window!r} is invalid: must be an integer >= 1 (steps)")


@dataclass(frozen=True)
class CollapseReport:
    """One layer whose load stayed degenerate for ``window`` steps: what and how much."""

    layer_number: int
    step: int
    starved_experts: list[int]  # load < min_load_fraction x mean
    overloaded_experts: list[int]  # the experts holding the max load when max/mean > max_load_ratio
    max_load_ratio: float
    min_load_ratio: float
    router_entropy: float
    reasons: list[str]

    def message(self, window: int) -> str:
        return (
            f"MoE layer {self.layer_number}: expert load degenerate for {window} steps (step {self.step}): "
            + "; ".join(self.reasons)
            + ". Training goes on; raise moe.aux_loss_coeff, lower the learning rate, or check the data"
        )

    def as_record(self) -> dict[str, Any]:
        return {
            "layer": self.layer_number,
            "starved_experts": self.starved_experts,
            "overloaded_experts": self.overloaded_experts,
            "max_load_ratio": self.max_load_ratio,
            "min_load_ratio": self.min_load_ratio,
            "router_entropy": self.router_entropy,
            "reasons": self.reasons,
        }


class ExpertCollapseMonitor:
    """Watches :meth:`MoEMetricsTracker.reduce`'s output for layers whose load stays degenerate.

    :meth:`update` returns a :class:`CollapseReport` for a layer once it has been degenerate for
    ``thresholds.window`` consecutive steps, and not again until it has recovered (one warning per
    episode). The decision uses only reduced metrics, so it is the same on every rank.
    """

    def __init__(self, thresholds: CollapseThresholds | None = None) -> None:
        self.thresholds = thresholds or CollapseThresholds()
        self._streak: dict[int, int] = {}
        self._reported: set[int] = set()

    def _check(self, number: int, metrics: Mapping[str, Any], step: int) -> CollapseReport | None:
        th = self.thresholds
        tokens = metrics.get(layer_key(number, "tokens_per_expert"))
        if tokens is None or np.asarray(tokens).sum() <= 0:
            return None
        load_E = np.asarray(tokens, dtype=np.float64)
        mean = float(load_E.mean())
        entropy = float(metrics.get(layer_key(number, "router_entropy"), math.inf))
        ratio = float(load_E.max() / mean)
        starved = np.flatnonzero(load_E < th.min_load_fraction * mean).tolist()
        reasons = []
        if starved:
            reasons.append(
                f"experts {starved} received under {th.min_load_fraction:.0%} of the mean load "
                f"({load_E[starved].astype(np.int64).tolist()} vs mean {mean:.1f} tokens)"
            )
        overloaded = np.flatnonzero(load_E == load_E.max()).tolist() if ratio > th.max_load_ratio else []
        if overloaded:
            reasons.append(f"experts {overloaded} hold {ratio:.2f}x the mean load (bound {th.max_load_ratio:g})")
        if entropy < th.min_entropy:
            reasons.append(f"router entropy {entropy:.4f} nats is below {th.min_entropy:g} (one-hot routing)")
        if not reasons:
            return None
        return CollapseReport(number, step, starved, overloaded, ratio, float(load_E.min() / mean), entropy, reasons)

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[CollapseReport]:
        """Feed one step's reduced metrics; the layers to report now."""
        numbers = sorted({parsed[0] for key in metrics if (parsed := _layer_of(key)) is not None})
        reports = []
        for number in numbers:
            report = self._check(number, metrics, step)
            if report is None:
                self._streak[number] = 0
                self._reported.discard(number)
                continue
            self._streak[number] = self._streak.get(number, 0) + 1
            if self._streak[number] >= self.thresholds.window and number not in self._reported:
                self._reported.add(number)
                reports.append(report)
        return reports
