"""Plan a training run before it queues: per-rank memory, communication and the best layouts.

    python launch/plan.py model=hf model.path=/models/Qwen3-235B-A22B parallel.pp=4 parallel.ep=8 --gpus 64
    python launch/plan.py model=hf model.path=/models/DeepSeek-V3 --search --gpus 256 --gpu-memory 80GiB
    python launch/plan.py +experiment=cpu_demo --gpus 2 --measure        # prediction against a real CPU step

Everything that is not a ``--flag`` is a Hydra override, exactly as ``launch/train.py`` takes them;
the model is built on the meta device from them (``model=hf`` reads config.json and nothing else).
Without ``--search`` it plans the configured layout (``parallel.*``, ``deepspeed.*``,
``train.micro_batch_size`` / ``grad_accum``) on ``--gpus`` devices; with it, it ranks every layout
DeepSpeed accepts on ``--gpus`` devices of ``--gpu-memory`` each at the same global batch. The
training app runs the same check at start-up (``train.device_memory``, ``train.memory_check``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from launch import config as app_config
from moe_parallel.planning.plan import (
    COMPONENTS,
    Cluster,
    GiB,
    Layout,
    LayoutPlan,
    PlanError,
    Planner,
    Workload,
    overflow_message,
    search,
)

# ---------------------------------------------------------------- from the app's config


def layout_of(cfg: DictConfig, world_size: int) -> Layout:
    """The layout ``cfg`` trains with on ``world_size`` ranks."""
    p = cfg.parallel
    if world_size % p.pp:
        raise PlanError(f"--gpus {world_size} is not divisible by parallel.pp={p.pp}")
    return Layout(
        pp=p.pp,
        dp=world_size // p.pp,
        ep=p.ep,
        zero_stage=cfg.deepspeed.zero_stage,
        micro_batch=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum,
        activation_checkpointing=bool(cfg.deepspeed.activation_checkpointing),
    )


def workload_of(cfg: DictConfig, precision: str | None = None, attention: str = "flash") -> Workload:
    """Sequence length, precision (``auto`` resolved as on this machine unless ``precision`` is given),
    weight decay and the DeepSpeed JSON of ``cfg``."""
    return Workload(
        seq_len=cfg.data.seq_len,
        precision=precision or app_config.resolve_precision(cfg.deepspeed.precision),
        attention=attention,
        weight_decay=cfg.optim.weight_decay,
        ds_config=app_config.deepspeed_config(cfg),
    )


def model_of(cfg: DictConfig):
    """The library config of ``cfg``'s model (``model=hf``: from config.json alone)."""
    return app_config.model_config(cfg, cfg.data.vocab_size)


def memory_check(cfg: DictConfig, world_size: int, device_memory: int, attention: str) -> LayoutPlan:
    """Refuse (``AppConfigError``) a layout whose planned peak per rank exceeds ``device_memory``:
    the message names the stage, the component that overflows and the cheapest fix. Run by every
    rank before any collective (each computes the same plan)."""
    planner = Planner(model_of(cfg))
    cluster = Cluster(gpus=world_size, gpu_memory=device_memory, margin=0.0)
    try:
        plan = planner.plan(layout_of(cfg, world_size), workload_of(cfg, attention=attention), cluster)
    except PlanError as err:
        raise app_config.AppConfigError(str(err)) from None
    if not plan.fits(cluster):
        where = "train.device_memory" if cfg.train.device_memory is not None else "the GPU's memory"
        raise app_config.AppConfigError(
            f"the planned memory does not fit {where}: {overflow_message(plan, cluster, planner)} "
            "(python launch/plan.py with the same overrides shows the whole plan; train.memory_check=false "
            "trains anyway)"
        )
    return plan


# ---------------------------------------------------------------- output


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f}"


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def distinct_stages(plan: LayoutPlan) -> list[tuple[str, Any]]:
    """Stages with the same numbers shown once: ``("stages 1-14", stage_plan)``."""
    groups: list[tuple[list[int], Any]] = []
    for st in plan.stages:
        if groups and groups[-1][1].memory == st.memory and groups[-1][1].comm == st.comm:
            groups[-1][0].append(st.stage)
        else:
            groups.append(([st.stage], st))
    return [(f"stage {s[0]}" if len(s) == 1 else f"stages {s[0]}-{s[-1]}", st) for s, st in groups]


def render_plan(plan: LayoutPlan, cluster: Cluster | None) -> str:
    lay, work = plan.layout, plan.workload
    columns = distinct_stages(plan)
    width = max(12, *(len(name) + 2 for name, _ in columns))
    big = max(st.total for st in plan.stages) >= GiB
    unit, scale = ("GiB", GiB) if big else ("MiB", 2**20)

    def fmt(n: float) -> str:
        return f"{n / scale:,.2f}"

    lines = [
        f"layout: world {lay.world_size} = pp {lay.pp} x dp {lay.dp} (ep {lay.ep}, expert-dp {lay.expert_dp}), "
        f"ZeRO-{lay.zero_stage}, micro-batch {lay.micro_batch} x {lay.grad_accum} accumulation, seq {work.seq_len}, "
        f"{work.precision}, {work.attention} attention"
        + (", activation checkpointing" if lay.activation_checkpointing and lay.pp > 1 else ""),
        "",
        f"per-rank memory, {unit}".ljust(22) + "".join(name.rjust(width) for name, _ in columns),
    ]
    for comp in COMPONENTS:
        lines.append(comp.ljust(22) + "".join(fmt(st.memory[comp]).rjust(width) for _, st in columns))
    lines.append("total".ljust(22) + "".join(fmt(st.total).rjust(width) for _, st in columns))
    lines.append(
        "  saved per micro-batch".ljust(22) + "".join(fmt(st.activations.saved).rjust(width) for _, st in columns)
    )
    if lay.pp > 1:  # what checkpointing would keep instead (the app checkpoints pipeline blocks)
        lines.append(
            "  same, checkpointed".ljust(22)
            + "".join(fmt(st.activations.saved_checkpointed).rjust(width) for _, st in columns)
        )
    lines.append(
        "  in flight (1F1B)".ljust(22) + "".join(str(st.inflight_micro_batches).rjust(width) for _, st in columns)
    )
    if cluster is not None:
        lines.append("device".ljust(22) + f"{_gib(cluster.gpu_memory)} GiB, fits under {_gib(cluster.usable_memory)}")
    lines += ["", "per-rank traffic per step".ljust(28) + "".join(name.rjust(width) for name, _ in columns)]
    rows = (
        ("all-to-all sent", lambda c: _size(c.alltoall_bytes)),
        ("all-to-all bound", lambda c: _size(c.alltoall_bound)),
        ("data-parallel grads", lambda c: _size(c.dp_grad_bytes)),
        ("expert-DP grads", lambda c: _size(c.expert_dp_grad_bytes)),
        ("pipeline sends", lambda c: _size(c.p2p_bytes)),
    )
    for name, fmt in rows:
        lines.append(name.ljust(28) + "".join(fmt(st.comm).rjust(width) for _, st in columns))
    lines.append(f"pipeline bubble: {plan.stages[0].comm.bubble_fraction:.1%} of the step")
    if plan.step_time:
        t = plan.step_time
        parts = ", ".join(f"{k} {v:.3f}" for k, v in t.items() if k != "total")
        lines.append(f"estimated step: {t['total']:.3f} s ({parts})")
    lines += ["", picture(plan, cluster)]
    return "\n".join(lines)


_MARKS = dict(zip(COMPONENTS, "PGMOALCR"))


def picture(plan: LayoutPlan, cluster: Cluster | None, width: int = 64) -> str:
    """Per-rank memory by component as text bars, one per distinct stage, scaled to the device."""
    scale = max([cluster.gpu_memory if cluster else 0] + [st.total for st in plan.stages])
    lines = ["memory per rank (" + ", ".join(f"{m} {c}" for c, m in _MARKS.items()) + ")"]
    for name, st in distinct_stages(plan):
        bar = "".join(_MARKS[c] * round(width * st.memory[c] / scale) for c in COMPONENTS)
        limit = round(width * cluster.usable_memory / scale) if cluster else None
        cells = bar.ljust(width, ".")
        if limit is not None and limit < width:
            cells = cells[:limit] + "|" + cells[limit:]
        lines.append(f"{name:>12} [{cells}] {_gib(st.total)} GiB")
    return "\n".join(lines)


def command_line(overrides: list[str], layout: Layout, cluster: Cluster) -> str:
    """The command that trains ``layout``: ``deepspeed`` on one node, ``sbatch`` on several."""
    keep = [o for o in overrides if o.split("=")[0].lstrip("+~") not in _LAYOUT_KEYS]
    keep += [
        f"parallel.pp={layout.pp}",
        f"parallel.ep={layout.ep}",
        f"deepspeed.zero_stage={layout.zero_stage}",
        f"train.micro_batch_size={layout.micro_batch}",
        f"train.grad_accum={layout.grad_accum}",
        f"deepspeed.activation_checkpointing={str(layout.activation_checkpointing).lower()}",
    ]
    args = " ".join(shlex.quote(o) for o in keep)
    per_node = min(cluster.gpus_per_node, layout.world_size)
    if layout.world_size <= cluster.gpus_per_node:
        return f"deepspeed --num_gpus {layout.world_size} launch/train.py {args}"
    nodes = layout.world_size // per_node
    return f"sbatch --nodes={nodes} --gpus-per-node={per_node} --ntasks-per-node={per_node} slurm/train.sbatch {args}"


_LAYOUT_KEYS = {
    "parallel.pp",
    "parallel.ep",
    "deepspeed.zero_stage",
    "train.micro_batch_size",
    "train.grad_accum",
    "deepspeed.activation_checkpointing",
}


def render_search(result, cluster: Cluster, overrides: list[str], top: int) -> str:
    lines = [
        f"{len(result.fitting) + len(result.rejected)} layouts on {cluster.gpus} GPUs "
        f"({cluster.gpus_per_node} per node, {_gib(cluster.gpu_memory)} GiB each): {len(result.fitting)} fit under "
        f"{_gib(cluster.usable_memory)} GiB, {len(result.rejected)} do not",
        f"step time: compute at {cluster.mfu:.0%} of {cluster.peak_flops / 1e12:.0f} TFLOP/s, collectives at "
        f"{cluster.intra_node_bandwidth / 1e9:.0f} GB/s in a node and {cluster.inter_node_bandwidth / 1e9:.0f} GB/s "
        "across nodes (estimates; memory is exact)",
        "",
    ]
    for i, plan in enumerate(result.fitting[:top], 1):
        lines.append(
            f"{i}. {plan.layout.describe()}: peak {_gib(plan.peak.total)} GiB (stage {plan.peak.stage}), "
            f"step ~{plan.step_time['total']:.2f} s"
        )
        lines.append("   " + command_line(overrides, plan.layout, cluster))
    if result.nearest is not None and not result.fitting:
        near = result.nearest
        lines.append(f"no layout fits; the nearest, {near.layout.describe()}: {overflow_message(near, cluster)}")
    elif not result.fitting:
        lines.append("no layout is possible: " + (result.rejected[0][1] if result.rejected else "none to try"))
    if result.fitting:
        best = result.fitting[0]
        lines += ["", f"best layout, {best.layout.describe()}:", render_plan(best, cluster)]
    return "\n".join(lines)


def plan_json(plan: LayoutPlan) -> dict[str, Any]:
    return {
        "layout": asdict(plan.layout),
        "workload": {k: v for k, v in asdict(plan.workload).items() if k != "ds_config"},
        "stages": [
            {"stage": st.stage, "memory": st.memory, "total": st.total, "comm": asdict(st.comm)} for st in plan.stages
        ],
        "step_time": plan.step_time,
    }


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python launch/plan.py",
        description="Per-rank memory, communication and the best layouts; other arguments are Hydra overrides.",
    )
    parser.add_argument("--gpus", type=int, help="devices in the job (default: parallel.pp x parallel.ep)")
    parser.add_argument("--gpu-memory", help="memory per device, e.g. 80GiB (needed by --search)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--search", action="store_true", help="rank every layout that fits, best first")
    parser.add_argument(
        "--global-batch",
        type=int,
        help="sequences per step to keep while searching "
        "(default: micro_batch_size x grad_accum x data-parallel ranks of the configured layout)",
    )
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--margin", type=float, default=0.10, help="memory kept free (fraction, default 0.10)")
    parser.add_argument("--reserve", default="2GiB", help="per-device memory outside the model (CUDA, NCCL)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--intra-node-gbps", type=float, default=450.0, help="GB/s per GPU inside a node")
    parser.add_argument("--inter-node-gbps", type=float, default=50.0, help="GB/s per GPU across nodes")
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        help="default: deepspeed.precision (auto plans bf16, what GPUs train in)",
    )
    parser.add_argument(
        "--attention",
        choices=("flash", "math"),
        default="flash",
        help="whose saved tensors count: flash (GPUs) or the math path (CPUs)",
    )
    parser.add_argument("--json", type=Path, help="also write the plan as JSON here")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="run the configured layout for one step on this machine's CPUs and compare",
    )
    known, rest = parser.parse_known_args(argv)
    flags = [a for a in rest if a.startswith("--")]
    if flags:
        parser.error(f"unknown option {flags[0]} (Hydra overrides have no leading dashes)")
    return known, rest


def _cluster(args: argparse.Namespace, gpus: int) -> Cluster | None:
    if args.gpu_memory is None:
        return None
    if not 0 <= args.margin < 1:
        raise PlanError(f"--margin={args.margin} must be in [0, 1)")
    return Cluster(
        gpus=gpus,
        gpu_memory=app_config.parse_bytes(args.gpu_memory, "--gpu-memory"),
        gpus_per_node=args.gpus_per_node,
        peak_flops=args.peak_tflops * 1e12,
        mfu=args.mfu,
        intra_node_bandwidth=args.intra_node_gbps * 1e9,
        inter_node_bandwidth=args.inter_node_gbps * 1e9,
        reserve=app_config.parse_bytes(args.reserve, "--reserve"),
        margin=args.margin,
    )


def run(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    cfg = app_config.compose(*overrides)
    if args.measure:
        from launch.plan_measure import measure

        return measure(cfg, overrides, args)
    config = model_of(cfg)
    gpus = args.gpus or cfg.parallel.pp * cfg.parallel.ep
    if gpus < 1:
        raise PlanError(f"--gpus={gpus} must be >= 1")
    precision = args.precision or ("bf16" if cfg.deepspeed.precision == "auto" else cfg.deepspeed.precision)
    workload = workload_of(cfg, precision=precision, attention=args.attention)
    cluster = _cluster(args, gpus)
    if args.search:
        if cluster is None:
            raise PlanError("--search needs --gpu-memory (e.g. --gpu-memory 80GiB)")
        configured = layout_of(cfg, gpus) if gpus % cfg.parallel.pp == 0 else None
        global_batch = args.global_batch or (
            cfg.train.micro_batch_size * cfg.train.grad_accum * (configured.dp if configured else gpus)
        )
        result = search(config, workload, cluster, global_batch)
        print(render_search(result, cluster, overrides, args.top))
        chosen = result.fitting[0] if result.fitting else None
    else:
        chosen = Planner(config).plan(layout_of(cfg, gpus), workload, cluster)
        print(render_plan(chosen, cluster))
        if cluster is not None and not chosen.fits(cluster):
            print(f"does not fit: {overflow_message(chosen, cluster)}")
    if args.json is not None and chosen is not None:
        args.json.write_text(json.dumps(plan_json(chosen), indent=1))
    return 0 if chosen is not None and (cluster is None or chosen.fits(cluster)) else 3


def main() -> None:
    from hydra.errors import HydraException

    from launch.exits import USER_ERRORS

    try:
        status = run(sys.argv[1:])
    except (*USER_ERRORS, PlanError, HydraException) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        status = 2
    sys.exit(status)


if __name__ == "__main__":
    main()
