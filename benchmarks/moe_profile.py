"""Where each implementation's step goes: self CPU time per cost category from ``torch.profiler``.

A tool of ``benchmarks/bench_moe.py`` (``--profile``): one table per config, rank 0's view at EP > 1,
each implementation in processes of its own (``harness.workers``).
"""

from __future__ import annotations

import statistics

from benchmarks.harness.configs import BenchConfig, Target
from benchmarks.harness.peers import IMPLS, Step
from benchmarks.harness.workers import Implementation

# torch.profiler op names per cost category (everything else: "other").
PROFILE_CATEGORIES = {
    "GEMM": ("aten::mm", "aten::addmm", "aten::bmm"),
    "activation": ("aten::gelu", "aten::gelu_backward"),
    "row scale and its gradient": ("aten::mul", "aten::mul_", "aten::sum"),
    "gather / scatter-add / fill": (
        "aten::index_select",
        "aten::scatter_add_",
        "aten::index_add_",
        "aten::fill_",
        "aten::zero_",
        "aten::index",
        "aten::_index_put_impl_",
        "aten::copy_",
        "aten::cat",
    ),
    "routing (gate, top-k, plan, aux loss)": (
        "aten::topk",
        "aten::sort",
        "aten::_softmax",
        "aten::_softmax_backward_data",
        "aten::bincount",
        "aten::cumsum",
        "aten::logsumexp",
        "aten::exp",
        "aten::exp_",
        "aten::log",
        "aten::log_",
        "aten::amax",
        "aten::div",
        "aten::sub",
        "aten::add",
        "aten::add_",
        "aten::clamp_min",
        "aten::mean",
        "aten::remainder",
        "aten::lt",
        "aten::arange",
        "aten::dot",
        "aten::one_hot",
        "aten::scatter_",
        "aten::scatter",
        "aten::gather",
        "aten::where",
        "aten::maximum",
        "aten::ceil",
    ),
    "all-to-all": ("c10d::alltoall_base_", "_AllToAll", "_AllToAllBackward"),
}


def profile_step(step: Step, target: Target, reps: int = 3) -> dict[str, float]:
    """Self CPU ms of one step per category: one unprofiled warm-up step, then the median of ``reps``
    profiled ones. A worker's ``measure`` command."""
    from torch.profiler import ProfilerActivity, profile

    step()
    samples = []
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        cats = {
            name: sum(e.self_cpu_time_total for e in events if e.key in ops) / 1e3
            for name, ops in PROFILE_CATEGORIES.items()
        }
        cats["other (Python, autograd, small ops)"] = total - sum(cats.values())
        cats["total (profiled)"] = total
        samples.append(cats)
    return {name: statistics.median(c[name] for c in samples) for name in samples[0]}


def run_profile(cfg: BenchConfig, target: Target) -> str:
    """Markdown table: where each implementation's step goes (rank 0 at EP > 1)."""
    columns = {}
    for name in IMPLS:
        procs = Implementation(cfg, name, target.for_config(cfg))
        try:
            columns[name] = procs.measure(profile_step)[0]
        finally:
            procs.close()
    lines = [f"| {cfg.name}: self CPU ms per step | " + " | ".join(IMPLS) + " |", "|---" * (len(IMPLS) + 1) + "|"]
    for cat in columns["ours"]:
        lines.append(f"| {cat} | " + " | ".join(f"{columns[n][cat]:.1f}" for n in IMPLS) + " |")
    return "\n".join(lines)
