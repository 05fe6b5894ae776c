"""Forward+backward of moe_parallel.MoELayer vs DeepSpeed's MoE vs the expert-GEMM floor.

CPU in fp32 by default; ``--device cuda`` runs the same comparison on a GPU in bf16 (NCCL for EP=2,
which needs a GPU per rank), with peak memory from the CUDA allocator's statistics.

For every config, four implementations run on the same input:

- ``ours``: :class:`moe_parallel.MoELayer` (GELU experts, no bias, ``drop_policy="position"``);
- ``deepspeed``: ``deepspeed.moe.layer.MoE`` with the same sizes, gate weights and expert weights;
- ``floor``: the expert GEMMs alone on the rows our router keeps for that input, pre-gathered into
  one contiguous tensor per expert: a plain autograd loop ``y_e = gelu(x_e @ W1[e]) @ W2[e]``;
- ``moved``: the floor's GEMMs plus the token movement that any routed layer adds on top of them,
  with the routing fixed in advance: every step our dispatcher gathers each expert's rows from ``x``
  and adds its output, times the plan's fixed combine weight, into ``y`` (and the reverse in
  backward); at EP=2 the two all-to-alls too. No router, no capacity plan, no gradient into the
  combine weights: what is left between ``moved`` and ``ours`` is the routing itself.

Times are medians over interleaved repetitions in one process (the order changes every repetition,
so background load hits all implementations alike, and each runs after each other one equally
often). Peak memory is measured in a fresh subprocess per implementation: see ``BENCHMARKS.md``
for the method. Config ``ep2`` is expert parallelism over two processes (gloo on CPU, NCCL on GPU):
the global batch of ``c1``, half of its tokens on each rank.

    .venv/bin/python benchmarks/bench_moe.py                  # everything, writes BENCHMARKS.md
    .venv/bin/python benchmarks/bench_moe.py --quick          # small smoke run, writes nothing
    .venv/bin/python benchmarks/bench_moe.py --configs c2 --reps 15 --no-memory --no-write
    .venv/bin/python benchmarks/bench_moe.py --tuned-malloc   # same, glibc keeps freed memory
    .venv/bin/python benchmarks/bench_moe.py --device cuda    # GPU, bf16: its own BENCHMARKS.md block
    .venv/bin/python benchmarks/bench_moe.py --device cuda --configs c1,c2,c3,large --json out.json
    .venv/bin/python benchmarks/bench_moe.py --comm             # collectives, bytes, host syncs: bench_comm.py

Config ``large`` (named only, not in the default set) fills a GPU: the layer shape of a 16B
fine-grained MoE model (T=65536, D=2048, F=1408, E=64, k=6). On a GPU the floor is the two grouped
GEMMs alone on pre-gathered, pre-aligned rows, and the table adds the achieved TFLOP/s of the expert
GEMMs (``12 * kept rows * D * F`` per forward+backward) against ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import io
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.env import free_port  # noqa: E402
from moe_parallel import MoEConfig, MoELayer, expert_capacity  # noqa: E402
from moe_parallel.core.capacity import DispatchPlan  # noqa: E402
from moe_parallel.experts import GroupedExperts, choice, grouped_mlp  # noqa: E402
from moe_parallel.experts.buffers import cached_bytes  # noqa: E402
from moe_parallel.integration.deepspeed import unlink_shm_allreduce_buffers  # noqa: E402

IMPLS = ("ours", "deepspeed", "floor", "moved")
COMPAT_IMPLS = ("deepspeed", "compat_module", "compat_parallel_mlp")  # the DeepSpeed drop-in's rows
MEMORY_IMPLS = ("ours", "deepspeed", "floor")
AUX_LOSS_COEFF = 0.01
# Every tensor buffer above 64 KiB gets its own mmap, returned to the OS when freed, so that RSS
# follows the live tensors instead of glibc's cached free lists (see measure_step_peak_mib). The
# memory processes of a point run side by side, more threads than cores: OpenMP threads that sleep
# instead of spinning at a barrier halve their wall time here (peaks unchanged).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_WAIT_POLICY": "PASSIVE"}


@dataclass(frozen=True)
class Target:
    """Where and in what precision every implementation runs: the same for all of them."""

    device: str = "cpu"  # "cpu" or "cuda" (rank r of an EP run uses cuda:r)
    dtype: str = "float32"  # parameters, activations and gradients; our router still computes in fp32
    threads: int | None = None  # torch CPU threads at EP=1 (EP>1 ranks get one each)
    expert_gemm: str = "auto"  # our experts' path: MoEConfig.expert_gemm

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def device_for(self, rank: int) -> torch.device:
        return torch.device(f"cuda:{rank}") if self.device == "cuda" else torch.device("cpu")

    def for_config(self, cfg: BenchConfig) -> Target:
        return dataclasses.replace(self, threads=1) if cfg.ep_size > 1 and self.device == "cpu" else self

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


@dataclass(frozen=True)
class BenchConfig:
    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    capacity_factor: float | None  # None: dropless
    ep_size: int = 1
    drop_policy: str = "position"  # ours only: DeepSpeed's gates fix their own (see BENCHMARKS.md)

    def label(self) -> str:
        ep = f", EP={self.ep_size}" if self.ep_size > 1 else ""
        cf = "dropless" if self.capacity_factor is None else f"{self.capacity_factor}"
        policy = f" {self.drop_policy}" if self.drop_policy != "position" and self.capacity_factor is not None else ""
        return f"T={self.tokens} D={self.hidden} F={self.ffn} E={self.experts} k={self.top_k} cf={cf}{policy}{ep}"


def _with_ep2(configs: dict[str, BenchConfig]) -> dict[str, BenchConfig]:
    """Adds ``ep2``: the global batch of ``c1`` on two gloo processes, half of its tokens on each."""
    return {**configs, "ep2": dataclasses.replace(configs["c1"], name="ep2", ep_size=2)}


CONFIGS = _with_ep2(
    {
        "c1": BenchConfig("c1", 4096, 512, 2048, 8, 2, 1.25),
        "c2": BenchConfig("c2", 4096, 512, 256, 64, 8, 1.25),
        "c3": BenchConfig("c3", 16384, 256, 512, 16, 2, 1.25),
        # The layer of a 16B fine-grained MoE model: fills a GPU, named only (--configs ...,large).
        "large": BenchConfig("large", 65536, 2048, 1408, 64, 6, 1.25),
    }
)
QUICK_CONFIGS = _with_ep2(
    {
        "c1": BenchConfig("c1", 256, 64, 128, 8, 2, 1.25),
        "c2": BenchConfig("c2", 256, 64, 32, 64, 8, 1.25),
        "c3": BenchConfig("c3", 512, 32, 64, 16, 2, 1.25),
        "large": BenchConfig("large", 512, 64, 48, 16, 6, 1.25),
    }
)
DEFAULT_CONFIGS = "c1,c2,c3,ep2"
# Dense bf16 GEMM rate of the lent H200 (8192^3 products, KINDS.md): the TFLOP/s columns' reference.
H200_BF16_TFLOPS = 790.0


def expert_gemm_flops(cfg: BenchConfig, kept_rows: int) -> float:
    """FLOPs of the expert GEMMs in one forward+backward on ``kept_rows`` routed rows.

    Two GEMMs of ``2 * n * D * F`` forward, twice that backward (input and weight gradients):
    ``12 * n * D * F``. Only kept rows count, for every implementation alike (DeepSpeed's padded
    capacity slots are work it does, not work the layer needs).
    """
    return 12.0 * kept_rows * cfg.hidden * cfg.ffn


# Optional (--tuned-malloc): glibc serves every allocation from its heap and keeps freed memory,
# instead of mapping each buffer above 32 MiB afresh (and page-faulting it in) on every step.
TUNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


# --------------------------------------------------------------------------- process groups


def init_distributed(rank: int, world_size: int, port: int, target: Target) -> None:
    """A gloo (CPU) or NCCL (GPU) group on 127.0.0.1, also registered with deepspeed.comm (its MoE needs it)."""
    import deepspeed

    backend = "nccl" if target.device == "cuda" else "gloo"
    if target.device == "cuda":
        torch.cuda.set_device(target.device_for(rank))
    init = f"tcp://127.0.0.1:{port}"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world_size)
    with contextlib.redirect_stdout(io.StringIO()):  # "... built successfully" banners
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    unlink_shm_allreduce_buffers()


def quiet_deepspeed(target: Target) -> None:
    os.environ.setdefault("DS_ACCELERATOR", target.device)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


# --------------------------------------------------------------------------- implementations


@dataclass
class Problem:
    """One config's shared pieces: our layer (it defines all weights), the input and output grad."""

    cfg: BenchConfig
    layer: MoELayer
    x_TD: Tensor
    grad_TD: Tensor


def make_problem(
    cfg: BenchConfig, ep_group: dist.ProcessGroup | None = None, rank: int = 0, target: Target = Target()
) -> Problem:
    config = MoEConfig(
        hidden_size=cfg.hidden,
        ffn_hidden_size=cfg.ffn,
        num_experts=cfg.experts,
        top_k=cfg.top_k,
        capacity_factor=cfg.capacity_factor,
        min_capacity=4,
        drop_policy=cfg.drop_policy,
        aux_loss_coeff=AUX_LOSS_COEFF,
        activation="gelu",
        expert_bias=False,
        expert_gemm=target.expert_gemm,
    )
    device, dtype = target.device_for(rank), target.torch_dtype()
    layer = MoELayer(config, ep_group=ep_group).to(device=device, dtype=dtype).train()
    local_tokens = cfg.tokens // cfg.ep_size
    gen = torch.Generator().manual_seed(1000 + rank)
    x_TD = torch.randn(local_tokens, cfg.hidden, generator=gen).to(device=device, dtype=dtype)
    grad_TD = torch.randn(local_tokens, cfg.hidden, generator=gen).to(device=device, dtype=dtype)
    return Problem(cfg, layer, x_TD, grad_TD)


@dataclass
class Step:
    """One forward+backward of an implementation; the gradients of ``leaves`` start from None.
    ``modules``: what it runs, where an ``expert_gemm`` command pins our experts' path."""

    run: Callable[[], None]
    leaves: list[Tensor]
    modules: list[nn.Module] = dataclasses.field(default_factory=list)

    def pin_expert_path(self, path: str) -> None:
        """Our experts in this step (``GroupedExperts``, the drop-in's experts) run ``path`` from now on,
        also where ``auto`` already resolved theirs."""
        for module in self.modules:
            for sub in module.modules():
                if hasattr(sub, "execution_path"):
                    sub.expert_gemm = path
                    # "grouped" is checked on the next forward (resolve_path); the CPU paths are fixed here.
                    sub.resolved_gemm = None if path == "grouped" else path

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def __call__(self) -> None:
        self.clear_grads()
        self.run()


def build_ours(problem: Problem) -> Step:
    layer, grad_TD = problem.layer, problem.grad_TD
    x_TD = problem.x_TD.clone().requires_grad_()

    def run() -> None:
        y_TD = layer(x_TD)  # the aux loss (coefficient included) reaches the gradient through y
        y_TD.backward(grad_TD)

    return Step(run, [x_TD, *layer.parameters()], [layer])


def build_ours_twin(problem: Problem) -> Step:
    """Ours again, on a second copy of the layer (its own weights, same values): timed beside ``ours``
    in one process, the two say how finely a run resolves a ratio (they should read 1.00)."""
    twin = MoELayer(problem.layer.config, ep_group=problem.layer.ep_group)
    twin.load_state_dict(problem.layer.state_dict())
    twin.to(device=problem.x_TD.device, dtype=problem.x_TD.dtype).train()
    return build_ours(dataclasses.replace(problem, layer=twin))


def build_deepspeed(problem: Problem) -> Step:
    """DeepSpeed's MoE layer with our gate and expert weights (so it routes exactly as we do for k=2)."""
    from deepspeed.moe.layer import MoE

    cfg, ours = problem.cfg, problem.layer
    expert = nn.Sequential(
        nn.Linear(cfg.hidden, cfg.ffn, bias=False), nn.GELU(), nn.Linear(cfg.ffn, cfg.hidden, bias=False)
    )
    moe = MoE(
        hidden_size=cfg.hidden,
        expert=expert,
        num_experts=cfg.experts,
        ep_size=cfg.ep_size,
        k=cfg.top_k,
        capacity_factor=cfg.capacity_factor or 1.0,
        eval_capacity_factor=cfg.capacity_factor or 1.0,
        min_capacity=4,
        noisy_gate_policy=None,
        drop_tokens=cfg.capacity_factor is not None,
        use_rts=False,
        top2_2nd_expert_sampling=False,  # deterministic top-2, as ours
    ).train()
    moe.to(device=problem.x_TD.device, dtype=problem.x_TD.dtype)
    moe.deepspeed_moe.gate.wg.float()  # DeepSpeed's gate multiplies an fp32 copy of the input
    with contextlib.redirect_stdout(io.StringIO()):  # "No existing process group found, creating ..."
        moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for j, local in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            local[0].weight.copy_(ours.experts.w1[j].t())
            local[2].weight.copy_(ours.experts.w2[j].t())
    x_TD = problem.x_TD.clone().requires_grad_()

    def run() -> None:
        y_TD, l_aux, _ = moe(x_TD)
        torch.autograd.backward([y_TD, l_aux], [problem.grad_TD, torch.full_like(l_aux, AUX_LOSS_COEFF)])

    return Step(run, [x_TD, *moe.parameters()])


def build_compat(problem: Problem, expert: nn.Module) -> Step:
    """The DeepSpeed drop-in (``moe_parallel.compat.MoE``) with ``expert``, DeepSpeed's deterministic
    gate settings as in :func:`build_deepspeed` and our gate weights."""
    from moe_parallel.integration.compat import MoE

    cfg = problem.cfg
    moe = MoE(
        cfg.hidden,
        expert,
        num_experts=cfg.experts,
        ep_size=cfg.ep_size,
        k=cfg.top_k,
        capacity_factor=cfg.capacity_factor or 1.0,
        eval_capacity_factor=cfg.capacity_factor or 1.0,
        min_capacity=4,
        drop_tokens=cfg.capacity_factor is not None,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    ).train()
    moe.to(device=problem.x_TD.device, dtype=problem.x_TD.dtype)
    with torch.no_grad():
        moe.router.weight.copy_(problem.layer.router.weight)
    x_TD = problem.x_TD.clone().requires_grad_()

    def run() -> None:
        y_TD, l_aux, _ = moe(x_TD)
        torch.autograd.backward([y_TD, l_aux], [problem.grad_TD, torch.full_like(l_aux, AUX_LOSS_COEFF)])

    return Step(run, [x_TD, *moe.parameters()], [moe])


def build_compat_module(problem: Problem) -> Step:
    """An expert no form recognises (Linear -> tanh -> Linear): one module copy per local expert."""
    cfg = problem.cfg
    return build_compat(
        problem, nn.Sequential(nn.Linear(cfg.hidden, cfg.ffn), nn.Tanh(), nn.Linear(cfg.ffn, cfg.hidden))
    )


def build_compat_sequential(problem: Problem) -> Step:
    """DeepSpeed's own expert as in :func:`build_deepspeed` (Linear -> GELU -> Linear, no bias): a
    fast-path form, stacked and run by our experts' kernels."""
    cfg = problem.cfg
    expert = nn.Sequential(
        nn.Linear(cfg.hidden, cfg.ffn, bias=False), nn.GELU(), nn.Linear(cfg.ffn, cfg.hidden, bias=False)
    )
    return build_compat(problem, expert)


def build_compat_parallel_mlp(problem: Problem) -> Step:
    """Megatron-DeepSpeed's expert (ParallelMLP, gelu, output bias skipped): stacked experts."""
    from tests.compat_doubles import ParallelMLP

    return build_compat(problem, ParallelMLP(problem.cfg.hidden, problem.cfg.ffn, "gelu"))


def routing_plan(problem: Problem) -> DispatchPlan:
    """Our layer's capacity plan for this input (what a training step computes)."""
    with torch.no_grad():
        return problem.layer.route_and_plan(problem.x_TD)[2]


def our_expert_path(problem: Problem) -> str:
    """The path our experts run on this input: ``auto`` resolved as the layer resolves it at its first
    forward (from the rows a balanced step gives each expert), a forced path as it is."""
    layer = problem.layer
    layer.resolve_expert_path(problem.x_TD)
    return layer.experts.execution_path(problem.x_TD)


def routed_rows(problem: Problem, plan: DispatchPlan | None = None) -> tuple[Tensor, list[int]]:
    """The rows our local experts receive for this input (kept assignments only, grouped by local
    expert), and rows per expert. At EP > 1 every rank of the group must call it (collectives)."""
    layer, x_TD = problem.layer, problem.x_TD
    plan = routing_plan(problem) if plan is None else plan
    with torch.no_grad():
        dispatch = layer.dispatcher.dispatch(x_TD, plan, host_counts=True)
        return layer.dispatcher.wait(dispatch), dispatch.counts_host


def build_floor(problem: Problem) -> Step:
    """The expert GEMMs alone: per-expert contiguous inputs and weights, plain autograd, no routing.

    Where our experts take the grouped GEMM (a GPU in bf16), the floor is the two grouped GEMMs alone.
    """
    rows_ND, counts = routed_rows(problem)
    experts = problem.layer.experts
    gen = torch.Generator().manual_seed(7)
    grad_list = [torch.randn(n, rows_ND.shape[1], generator=gen).to(rows_ND) for n in counts]
    if our_expert_path(problem) == "grouped":
        return build_grouped_floor(rows_ND, counts, grad_list, experts)
    x_list = [chunk.clone().requires_grad_() for chunk in rows_ND.split(counts)]
    w1_list = [w.detach().clone().requires_grad_() for w in experts.w1]
    w2_list = [w.detach().clone().requires_grad_() for w in experts.w2]

    def run() -> None:
        outs = []
        for x_e, w1, w2 in zip(x_list, w1_list, w2_list):
            h = x_e @ w1
            a = F.gelu(h)
            outs.append(a @ w2)
        torch.autograd.backward(outs, grad_list)

    return Step(run, [*x_list, *w1_list, *w2_list])


def build_grouped_floor(rows_ND: Tensor, counts: list[int], grad_list: list[Tensor], experts: GroupedExperts) -> Step:
    """Two grouped GEMMs and the activation on rows gathered in advance, every expert's block already
    starting on the kernels' 16-byte alignment (so the step pads nothing; padding rows are zero and
    get zero gradients). The same rows and output gradients as the per-expert floor."""
    align = max(1, 16 // rows_ND.element_size())
    padded = [-(-n // align) * align for n in counts]
    x_ND = rows_ND.new_zeros(sum(padded), rows_ND.shape[1])
    grad_ND = torch.zeros_like(x_ND)
    start = 0
    for block, grad, n, p in zip(rows_ND.split(counts), grad_list, counts, padded):
        x_ND[start : start + n] = block
        grad_ND[start : start + n] = grad
        start += p
    x_ND.requires_grad_()
    counts_e = torch.tensor(padded, device=x_ND.device)
    w1 = experts.w1.detach().clone().requires_grad_()
    w2 = experts.w2.detach().clone().requires_grad_()

    def run() -> None:
        grouped_mlp(x_ND, counts_e, w1, w2, None, None, "gelu").backward(grad_ND)

    return Step(run, [x_ND, w1, w2])


def build_moved(problem: Problem) -> Step:
    """The floor's GEMMs plus token movement: our experts and dispatcher on a plan fixed in advance,
    the experts on the path ours takes (until an ``expert_gemm`` command pins another)."""
    layer, grad_TD = problem.layer, problem.grad_TD
    plan = routing_plan(problem)
    our_expert_path(problem)
    x_TD = problem.x_TD.clone().requires_grad_()

    def run() -> None:
        dispatcher, experts = layer.dispatcher, layer.experts
        dispatch = dispatcher.dispatch(x_TD, plan, host_counts=experts.needs_host_counts(x_TD))
        x_local = dispatcher.wait(dispatch)
        out_local = experts(x_local, dispatch.tokens_per_local_expert, dispatch.counts_host)
        dispatcher.combine(out_local, dispatch.state).backward(grad_TD)

    return Step(run, [x_TD, *layer.experts.parameters()], [layer.experts])


BUILDERS: dict[str, Callable[[Problem], Step]] = {
    "ours": build_ours,
    "ours_twin": build_ours_twin,
    "deepspeed": build_deepspeed,
    "compat_module": build_compat_module,
    "compat_parallel_mlp": build_compat_parallel_mlp,
    "compat": build_compat_sequential,
    "floor": build_floor,
    "moved": build_moved,
}


def row_counts(problem: Problem) -> tuple[int, int]:
    """This rank's kept rows (what our experts compute on) and its busiest expert's routed rows
    (before dropping: what DeepSpeed pads every expert to when dropless)."""
    plan = routing_plan(problem)
    return sum(routed_rows(problem, plan)[1]), int(plan.routed_per_expert_E.max())


# --------------------------------------------------------------------------- worker processes


def _proc_status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def measure_step_peak_mib(step: Step) -> float:
    """Peak RSS growth of one step over the RSS just before it (MiB).

    After a warm-up step (lazy init, kernel caches) and with its gradients freed, the kernel's
    high-water mark is reset (``/proc/self/clear_refs`` = 5), one step runs, and its peak VmHWM is
    compared with the VmRSS before it: the extra memory the step needed at its worst moment
    (activations, saved tensors, temporaries, gradients of weights and input). Our pooled gradient
    buffers (``experts/buffers.py``) stay resident between steps, idle: they are counted as the step's,
    not as the baseline's, since a layer that frees its gradients leaves that memory to the forward.
    """
    step()
    step.clear_grads()
    gc.collect()
    base = _proc_status_kib("VmRSS") - cached_bytes()[1] // 1024
    Path("/proc/self/clear_refs").write_text("5")
    step()
    return (_proc_status_kib("VmHWM") - base) / 1024


def measure_step_peak_mib_cuda(step: Step) -> float:
    """GPU: peak allocated memory of one step over the memory allocated just before it (MiB)."""
    step()
    step.clear_grads()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# torch.profiler op names per cost category, for --profile (everything else: "other").
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


def profile_step(step: Step, reps: int = 3) -> dict[str, float]:
    """Self CPU ms of one step per category (median of ``reps`` profiled steps)."""
    from torch.profiler import ProfilerActivity, profile

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


def _worker(conn, cfg: BenchConfig, impl: str, rank: int, port: int, target: Target) -> None:
    """One rank of one implementation; runs the parent's commands until "stop".

    Every implementation lives in processes of its own: glibc's heap state (its dynamic mmap and
    trim thresholds, its free lists) then depends only on that implementation's own allocations, not
    on which implementation happened to run before it in the same process.
    """
    if target.threads:
        torch.set_num_threads(target.threads)
    quiet_deepspeed(target)
    distributed = cfg.ep_size > 1 or "deepspeed" in impl.split("+")
    if distributed:
        init_distributed(rank, cfg.ep_size, port, target)
    elif target.device == "cuda":
        torch.cuda.set_device(target.device_for(rank))

    def fence() -> None:
        target.sync()
        if cfg.ep_size > 1:
            dist.barrier()

    problem = make_problem(cfg, ep_group=dist.group.WORLD if cfg.ep_size > 1 else None, rank=rank, target=target)
    # "a+b+...": these implementations in this one process ("step:b" runs b), for ratios with no
    # process-to-process difference in them (heap layout, page placement; see SWEEP_PROCESS).
    steps = {name: BUILDERS[name](problem) for name in impl.split("+")}
    step = steps[impl.split("+")[0]]
    gc.freeze()  # the gc.collect() before each step then scans the step's garbage, not the whole heap
    conn.send(row_counts(problem))
    while (command := conn.recv()) != "stop":
        if command.startswith("step"):
            chosen = steps[command.split(":", 1)[1]] if ":" in command else step
            gc.collect()
            fence()
            start = time.perf_counter()
            try:
                chosen()
            except RuntimeError as err:  # e.g. out of memory: this implementation fails, the others go on
                if cfg.ep_size > 1:  # the other rank may wait in a collective: end the process group
                    raise
                conn.send(StepFailed(str(err)[:500]))
                chosen.clear_grads()
                continue
            fence()
            conn.send(time.perf_counter() - start)
            # The next step, of whichever implementation, starts with no gradients alive.
            chosen.clear_grads()
        elif command == "peak":
            measure = measure_step_peak_mib_cuda if target.device == "cuda" else measure_step_peak_mib
            conn.send(measure(step))
        elif command == "path":  # which expert path our layer takes on this input (experts/choice.py)
            conn.send(our_expert_path(problem))
        elif command.startswith("expert_gemm:"):  # this rank's experts run the named path from now on
            path = command.split(":", 1)[1].split(",")[rank]
            for pinned in steps.values():
                pinned.pin_expert_path(path)
            conn.send(None)
        elif command == "profile":
            step()
            conn.send(profile_step(step))
    if distributed:
        dist.destroy_process_group()


class StepFailed(str):
    """A worker's answer to "step" when the step raised (the message)."""


class Implementation:
    """The process(es) of one implementation on one config: one per EP rank."""

    def __init__(
        self, cfg: BenchConfig, impl: str, target: Target, env: dict[str, str] | None = None, wait: bool = True
    ) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = free_port()
        saved = dict(os.environ)
        os.environ.update(env or {})  # a spawned child starts with the parent's environment
        try:
            self.conns, self.procs = [], []
            for rank in range(cfg.ep_size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, cfg, impl, rank, port, target), daemon=True)
                proc.start()
                self.conns.append(parent)
                self.procs.append(proc)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.kept_rows = 0
        self.busiest_routed = 0
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Until every rank has built its model (raises if a worker died)."""
        kept, busiest = zip(*self.receive())
        self.kept_rows, self.busiest_routed = sum(kept), max(busiest)

    def send(self, command: str) -> None:
        for conn in self.conns:
            conn.send(command)

    def receive(self) -> list:
        """One answer from every rank, in rank order (raises if a worker died)."""
        results = []
        for conn, proc in zip(self.conns, self.procs):
            died = "a benchmark worker died (exit code {}); see its stderr above"
            while not conn.poll(1.0):
                if not proc.is_alive():
                    raise RuntimeError(died.format(proc.exitcode))
            try:
                results.append(conn.recv())
            except EOFError:  # it died after the poll
                proc.join(timeout=10)
                raise RuntimeError(died.format(proc.exitcode)) from None
        return results

    def request(self, command: str) -> list:
        self.send(command)
        return self.receive()

    def step(self, name: str | None = None) -> float:
        """Seconds of one forward+backward: the slowest rank's (the step ends when all are done).
        ``name``: which implementation of a shared process ("a+b+...") runs; default the first.
        Raises RuntimeError if it failed on any rank."""
        results = self.request("step" if name is None else f"step:{name}")
        failures = [str(r) for r in results if isinstance(r, StepFailed)]
        if failures:
            raise RuntimeError(failures[0])
        return max(results)

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                with contextlib.suppress(OSError):
                    conn.send("stop")
        for proc in self.procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()


# --------------------------------------------------------------------------- timing and memory


@dataclass
class Timing:
    """Seconds per step of each implementation, one entry per round (rounds are aligned).

    An implementation that failed (its worker died: out of memory, an exception) has no rounds; its
    reason is in ``failed`` and its cells stay empty.
    """

    rounds: dict[str, list[float]]
    kept_rows: int
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    deepspeed_rows: int = 0  # the rows DeepSpeed's experts compute on, padding included (ds_buffer_rows)
    expert_paths: list[str] | None = None  # the path ours' experts ran, per rank (None: ours did not run)

    def padding_ratio(self) -> float | None:
        """DeepSpeed's expert rows over ours: DS / ours if both ran nothing but their expert GEMMs."""
        return self.deepspeed_rows / self.kept_rows if self.kept_rows and self.deepspeed_rows else None

    def median_ms(self, name: str) -> float | None:
        return statistics.median(self.rounds[name]) * 1e3 if self.rounds.get(name) else None

    def ratio(self, num: str, den: str) -> float | None:
        """Median over rounds of the per-round ratio: load that drifts between rounds cancels out."""
        if not (self.rounds.get(num) and self.rounds.get(den)):
            return None
        return statistics.median(a / b for a, b in zip(self.rounds[num], self.rounds[den]))


def balanced_orders(n: int) -> list[list[int]]:
    """``n - 1`` round orders of ``n`` implementations (each order a permutation) such that, run one
    after another and over again, each implementation runs right after each other one exactly once
    per cycle, across the rounds' boundaries too.

    A plain rotation keeps every implementation behind the same predecessor in all but one round, and
    the predecessor matters: a step right after DeepSpeed's, whose buffers push the others' data out
    of the caches, read 2-4% slower here (BENCHMARKS.md, "Shape sweep"). Found by a depth-first search
    (instant up to a dozen implementations; a bench runs 4-5).
    """
    if n <= 2:
        return [list(range(n))] if n else []
    length = n * (n - 1)
    sequence, followed = [0], set()

    def extend() -> bool:
        if len(sequence) == length:  # closing the cycle must add the one pair not yet used
            return sequence[-1] != sequence[0] and (sequence[-1], sequence[0]) not in followed
        in_round = sequence[len(sequence) - len(sequence) % n :]
        for nxt in range(n):
            pair = (sequence[-1], nxt)
            if nxt in in_round or nxt == sequence[-1] or pair in followed:
                continue
            followed.add(pair)
            sequence.append(nxt)
            if extend():
                return True
            sequence.pop()
            followed.discard(pair)
        return False

    if not extend():
        raise RuntimeError(f"no balanced round orders for {n} implementations")
    return [sequence[i : i + n] for i in range(0, length, n)]


def time_interleaved(
    steps: dict[str, Callable[[], float]], warmup: int, reps: int, failed: dict[str, str] | None = None
) -> dict[str, list[float]]:
    """Seconds per step of each implementation, in rounds whose orders balance which implementation
    runs right before which (``balanced_orders``).

    With ``failed`` given, an implementation whose step raises RuntimeError is dropped (the reason goes
    into ``failed``) and the others go on.
    """
    names = list(steps)
    rounds: dict[str, list[float]] = {name: [] for name in names}

    def one(name: str, record: bool) -> None:
        if name not in rounds:
            return
        try:
            seconds = steps[name]()
        except RuntimeError as err:
            if failed is None:
                raise
            failed[name] = str(err)
            del rounds[name]
            return
        if record:
            rounds[name].append(seconds)

    orders = balanced_orders(len(names))
    for rnd in range(-warmup, reps):  # warm-up rounds end with the order the first timed one follows in a cycle
        for i in orders[rnd % len(orders)]:
            one(names[i], record=rnd >= 0)
    return rounds


def start_implementations(cfg: BenchConfig, names: tuple[str, ...], target: Target):
    """One process (group) per implementation, started together; returns (live ones, failed ones)."""
    impls, failed = {}, {}
    for name in names:
        impls[name] = Implementation(cfg, name, target.for_config(cfg), wait=False)
    for name in list(impls):
        try:
            impls[name].wait_ready()
        except RuntimeError as err:
            failed[name] = str(err)
            impls.pop(name).close()
    return impls, failed


def run_timing(
    cfg: BenchConfig, warmup: int, reps: int, target: Target, cuda_memory: bool = False
) -> tuple[Timing, dict[str, float] | None]:
    """Interleaved rounds over one live process (group) per implementation.

    ``cuda_memory``: also the peak memory of one step, read from the CUDA allocator of the same
    processes (exact per process, so no fresh process is needed as on CPU).
    """
    impls, failed = start_implementations(cfg, IMPLS, target)
    try:
        paths = impls["ours"].request("path") if "ours" in impls else None
        if paths and "moved" in impls:
            # moved is ours without the routing: the same expert path on every rank as ours' layer
            # (experts/choice.py), whatever its own experts alone would resolve.
            impls["moved"].request("expert_gemm:" + ",".join(paths))
        steps = {name: impl.step for name, impl in impls.items()}
        rounds = time_interleaved(steps, warmup, reps, failed)
        any_impl = next(iter(impls.values()), None)
        kept = any_impl.kept_rows if any_impl else 0
        ds_rows = ds_buffer_rows(cfg, any_impl.busiest_routed) if any_impl else 0
        peak = None
        if cuda_memory:
            peak = {}
            for name in MEMORY_IMPLS:
                if name in rounds:
                    try:
                        peak[name] = max(impls[name].request("peak"))
                    except RuntimeError as err:
                        failed[name] = f"peak memory: {err}"
        return Timing(rounds, kept, failed, ds_rows, paths), peak
    finally:
        for impl in impls.values():
            impl.close()


def run_compat_timing(cfg: BenchConfig, warmup: int, reps: int, target: Target) -> Timing:
    """Interleaved rounds of DeepSpeed's layer and the drop-in with both expert kinds."""
    impls = {name: Implementation(cfg, name, target.for_config(cfg)) for name in COMPAT_IMPLS}
    try:
        rounds = time_interleaved({name: impl.step for name, impl in impls.items()}, warmup, reps)
        ds = impls["deepspeed"]
        return Timing(rounds, ds.kept_rows, deepspeed_rows=ds_buffer_rows(cfg, ds.busiest_routed))
    finally:
        for impl in impls.values():
            impl.close()


def compat_table(rows: list[tuple[BenchConfig, Timing]]) -> str:
    """The DeepSpeed drop-in against DeepSpeed's own layer (same gate settings and weights)."""
    lines = [
        "| config | DeepSpeed ms | drop-in, module-copy expert ms | drop-in, ParallelMLP expert ms "
        "| DeepSpeed / drop-in (module copies) | DeepSpeed / drop-in (ParallelMLP) |",
        "|---|---|---|---|---|---|",
    ]
    for cfg, t in rows:
        lines.append(
            f"| {cfg.name} (drop-in): {cfg.label()} | {t.median_ms('deepspeed'):.1f} "
            f"| {t.median_ms('compat_module'):.1f} | {t.median_ms('compat_parallel_mlp'):.1f} "
            f"| {t.ratio('deepspeed', 'compat_module'):.2f} | {t.ratio('deepspeed', 'compat_parallel_mlp'):.2f} |"
        )
    return "\n".join(lines)


def run_profile(cfg: BenchConfig, target: Target) -> str:
    """Markdown table: where each implementation's step goes (rank 0 at EP > 1)."""
    columns = {}
    for name in IMPLS:
        procs = Implementation(cfg, name, target.for_config(cfg))
        try:
            columns[name] = procs.request("profile")[0]
        finally:
            procs.close()
    lines = [f"| {cfg.name}: self CPU ms per step | " + " | ".join(IMPLS) + " |", "|---" * (len(IMPLS) + 1) + "|"]
    for cat in columns["ours"]:
        lines.append(f"| {cat} | " + " | ".join(f"{columns[n][cat]:.1f}" for n in IMPLS) + " |")
    return "\n".join(lines)


def run_memory(
    cfg: BenchConfig, impls: tuple[str, ...], target: Target, expert_paths: list[str] | None = None
) -> dict[str, float]:
    """Peak MiB of one step of each implementation, each in fresh processes of its own (the larger
    rank's, at EP > 1); on CPU under MEMORY_ENV. The processes run side by side: a peak is a
    per-process count, unaffected by what the others do. One that fails has no entry.

    ``expert_paths`` (one per rank): the path our experts took where they were timed, pinned here so
    that the memory is that path's (the drop-in's and ``moved``'s experts would otherwise resolve
    their own)."""
    env = MEMORY_ENV if target.device == "cpu" else None
    procs = {impl: Implementation(cfg, impl, target.for_config(cfg), env=env, wait=False) for impl in impls}
    pinned = {impl for impl in impls if expert_paths and impl != "deepspeed"}
    peak = {}
    try:
        for impl, proc in procs.items():  # queued behind the build
            if impl in pinned:
                proc.send("expert_gemm:" + ",".join(expert_paths))
            proc.send("peak")
        for impl, proc in procs.items():
            try:
                proc.wait_ready()
                if impl in pinned:
                    proc.receive()
                peak[impl] = max(proc.receive())
            except RuntimeError as err:
                print(f"peak memory of {impl}: {err}", file=sys.stderr)
    finally:
        for proc in procs.values():
            proc.close()
    return peak


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    cfg: BenchConfig
    timing: Timing
    peak_mib: dict[str, float] | None


def ds_buffer_rows(cfg: BenchConfig, busiest_routed: int = 0) -> int:
    """Rows DeepSpeed's experts compute on: E x capacity (padded), summed over ranks. Dropless, the
    capacity is the busiest expert's load on any rank (``busiest_routed``; 0 when not known)."""
    local_tokens = cfg.tokens // cfg.ep_size
    capacity = expert_capacity(local_tokens, cfg.top_k, cfg.experts, cfg.capacity_factor, 4)
    if capacity is None:
        capacity = min(busiest_routed, local_tokens)
    return cfg.ep_size * cfg.experts * capacity


def _mib(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def tflops(row: Row, impl: str) -> float | None:
    """Achieved TFLOP/s of the expert GEMMs (see :func:`expert_gemm_flops`) at ``impl``'s median step."""
    ms = row.timing.median_ms(impl)
    return None if ms is None else expert_gemm_flops(row.cfg, row.timing.kept_rows) / (ms * 1e-3) / 1e12


def markdown_table(rows: list[Row], peak_tflops: float | None = None) -> str:
    """The results table; with ``peak_tflops`` (GPU runs) also the expert GEMMs' TFLOP/s and % of it."""
    head = (
        "| config | kept rows (ours / DS buffer) | ours ms | DeepSpeed ms | floor ms | moved ms "
        "| ours/floor | DS/floor | DS/ours | moved/floor | ours/moved "
        "| peak MiB ours | peak MiB DS | peak MiB floor |"
    )
    if peak_tflops:
        head += f" TFLOP/s ours | TFLOP/s DS | TFLOP/s floor | ours % of {peak_tflops:g} | floor % of {peak_tflops:g} |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    notes = []
    for row in rows:
        t = row.timing
        mem = row.peak_mib or {}
        mem_cells = [_mib(mem[i]) if i in mem else "-" for i in MEMORY_IMPLS]
        line = (
            f"| {row.cfg.name}: {row.cfg.label()} | {t.kept_rows} / {t.deepspeed_rows} "
            + "".join(f"| {_cell(t.median_ms(i), '.1f')} " for i in IMPLS)
            + "".join(
                f"| {_cell(t.ratio(a, b), '.2f')} "
                for a, b in (("ours", "floor"), ("deepspeed", "floor"), ("deepspeed", "ours"), ("moved", "floor"))
            )
            + f"| {_cell(t.ratio('ours', 'moved'), '.2f')} | {' | '.join(mem_cells)} |"
        )
        if peak_tflops:
            rates = [tflops(row, i) for i in ("ours", "deepspeed", "floor")]
            pcts = [None if r is None else 100 * r / peak_tflops for r in (rates[0], rates[2])]
            line += "".join(f" {_cell(r, '.3g')} |" for r in rates) + "".join(f" {_cell(p, '.1f')} |" for p in pcts)
        lines.append(line)
        notes += [
            f"- {row.cfg.name}: {impl} failed: {reason.splitlines()[0][:300]}" for impl, reason in t.failed.items()
        ]
    return "\n".join(lines + ([""] + notes if notes else []))


def row_json(row: Row, peak_tflops: float | None = None) -> dict:
    """One config's results as plain data (the GPU check's results file)."""
    t = row.timing
    return {
        "config": dataclasses.asdict(row.cfg),
        "label": row.cfg.label(),
        "kept_rows": t.kept_rows,
        "deepspeed_buffer_rows": t.deepspeed_rows,
        "median_ms": {i: t.median_ms(i) for i in IMPLS},
        "ratios": {
            f"{a}/{b}": t.ratio(a, b)
            for a, b in (("ours", "floor"), ("deepspeed", "floor"), ("deepspeed", "ours"), ("moved", "floor"))
            + (("ours", "moved"),)
        },
        "peak_mib": row.peak_mib,
        "expert_gemm_tflop_per_step": expert_gemm_flops(row.cfg, t.kept_rows) / 1e12,
        "tflops": {i: tflops(row, i) for i in IMPLS},
        "peak_tflops": peak_tflops,
        "failed": t.failed,
        "rounds_s": t.rounds,
    }


def machine_line(target: Target) -> str:
    from importlib.metadata import version

    versions = f"torch {torch.__version__}, deepspeed {version('deepspeed')}, Python {platform.python_version()}"
    if target.device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, {target.dtype}, {versions}"
    threads = target.threads or torch.get_num_threads()
    cpu = platform.processor() or "cpu"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return (
        f"{os.cpu_count()}-core CPU ({cpu}), {target.dtype}, {threads} torch threads at EP=1 and 1 per rank "
        f"at EP=2, {versions}"
    )


def write_results(path: Path, block: str, command: str, machine: str, table: str) -> None:
    """Replace one results block of BENCHMARKS.md (the rest of the page is hand-written)."""
    begin, end = f"<!-- bench_moe {block} begin -->", f"<!-- bench_moe {block} end -->"
    malloc = " ".join(f"{k}={v}" for k, v in TUNED_MALLOC_ENV.items()) if block == "tuned-malloc" else ""
    lines = [
        begin,
        f"Command: `{command}`" + (f" (re-executes itself under `{malloc}`)" if malloc else "") + "  ",
        f"Machine: {machine}  ",
        f"Date: {datetime.date.today().isoformat()}",
        "",
        table,
        end,
    ]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    before, rest = text.split(begin, 1)
    after = rest.split(end, 1)[1]
    path.write_text(before + "\n".join(lines) + after)


# --------------------------------------------------------------------------- shape sweep (--sweep)

SWEEP_EXPERTS = (8, 16, 32, 64, 128)
SWEEP_TOP_K = (1, 2, 4, 6, 8)
SWEEP_HIDDEN = (256, 512, 1024)
SWEEP_FFN_RATIO = (0.5, 1, 2, 4)
SWEEP_CAPACITY = (1.0, 1.25, 2.0, None)  # None: dropless
SWEEP_POLICY = ("position", "probs")
# Every implementation of a sweep point runs in one process (one per EP rank), round by round, as the
# issue asks: two processes running identical code differed by 0.91-1.14 here (10th-90th percentile
# over a sweep), more than the gaps to resolve. "ours_twin" is ours on a second copy of the layer:
# twin / ours is what the run resolves at that point.
SWEEP_PROCESS = ("ours", "deepspeed", "compat", "moved", "ours_twin")
# That process's glibc keeps what is freed (TUNED_MALLOC_ENV): no implementation page-faults memory in
# after warm-up, whatever ran before it. With glibc's trimming, one implementation's frees decided
# whether the next one's buffers came back warm: DeepSpeed at s17 took 788 ms alone in a process and
# 1,629 ms next to two others (its GEMMs writing freshly faulted gradients), ours about the same in
# both. Keeping freed memory, both slowed alike (730 -> 958, 428 -> 582). BENCHMARKS.md, "Shape sweep".
SWEEP_MALLOC_ENV = TUNED_MALLOC_ENV
SWEEP_MEMORY_IMPLS = ("ours", "deepspeed", "compat")
SWEEP_SEED = 12
SWEEP_TARGET_S = 0.4  # estimated DeepSpeed step (the slowest of the three), seconds
# What sizes T: this 2-core CPU's sustained fp32 GEMM rate and row-copy bandwidth, measured once at low
# load (BENCHMARKS.md, "Shape sweep"). Fixed here, not read from the cost model, so the sweep's shapes
# stay the same when the cost model is recalibrated.
SWEEP_GEMM_FLOPS, SWEEP_MOVE_BYTES_PER_S = 1.3e11, 4.0e9
# On a GPU (bf16): an H200's sustained grouped-GEMM rate and HBM copy bandwidth, roughly; T is
# clamped higher there, so that a step is not all launch latency.
SWEEP_GPU_GEMM_FLOPS, SWEEP_GPU_MOVE_BYTES_PER_S, SWEEP_GPU_MAX_TOKENS = 4.0e14, 2.0e12, 131072
# Rows moved per routed row and step, beyond the GEMMs (gathers, scatters, fills, activation passes),
# in units of D (and of F for the activation): a rough count for DeepSpeed's padded layer.
SWEEP_ROW_PASSES_D, SWEEP_ROW_PASSES_F = 12.0, 6.0
# Named shapes of issue 12 (where DeepSpeed led before), run at their own T.
SWEEP_NAMED = (
    BenchConfig("issue-switch", 8192, 512, 1024, 16, 1, 1.0),
    BenchConfig("issue-small-experts", 4096, 256, 1024, 64, 2, 1.25),
)


def sweep_tokens(
    hidden: int,
    ffn: int,
    top_k: int,
    capacity_factor: float | None,
    experts: int,
    target_s: float = SWEEP_TARGET_S,
    device: str = "cpu",
) -> int:
    """T such that DeepSpeed's step takes about SWEEP_TARGET_S here, from a FLOP and traffic estimate.

    Per token DeepSpeed computes ``k * cf`` expert rows (dropless: about 1.3 for the imbalance of a
    fresh router): ``12 D F`` FLOPs each at the cost model's calibrated GEMM rate, plus the row passes
    above at its calibrated copy bandwidth. Rounded to a multiple of 64, within [256, 32768].
    """
    gpu = device == "cuda"
    flops = SWEEP_GPU_GEMM_FLOPS if gpu else SWEEP_GEMM_FLOPS
    bandwidth, elem_bytes = (SWEEP_GPU_MOVE_BYTES_PER_S, 2.0) if gpu else (SWEEP_MOVE_BYTES_PER_S, 4.0)
    rows = top_k * (1.3 if capacity_factor is None else capacity_factor)
    gemm_s = 12.0 * hidden * ffn / flops
    move_s = elem_bytes * (SWEEP_ROW_PASSES_D * hidden + SWEEP_ROW_PASSES_F * ffn) / bandwidth
    per_token_s = rows * (gemm_s + move_s) + 4.0 * 8 * experts / bandwidth  # + the router's [T, E]
    tokens = int(target_s / per_token_s) // 64 * 64
    return max(256, min(SWEEP_GPU_MAX_TOKENS if gpu else 32768, tokens))


def _balanced(values: tuple, count: int, rng) -> list:
    """``count`` draws from ``values``, each value equally often (up to one), in a shuffled order."""
    out = [values[i % len(values)] for i in range(count)]
    rng.shuffle(out)
    return out


def sweep_points(
    count: int = 32,
    ep2: int = 3,
    quick: bool = False,
    target_s: float = SWEEP_TARGET_S,
    device: str = "cpu",
    seed: int = SWEEP_SEED,
) -> list[BenchConfig]:
    """The sampled sweep: ``count`` EP=1 points whose every axis is balanced (each value of each axis
    appears equally often), the issue's named shapes, and ``ep2`` of the points again at EP=2.

    Deterministic for a ``seed``; another seed draws a held-out sample of the same space. ``quick``:
    the same machinery at tiny sizes, two points and one EP=2 point.
    """
    import random

    rng = random.Random(seed)
    if quick:
        points = [
            BenchConfig("q1", 256, 32, 64, 8, 1, 1.0),
            BenchConfig("q2", 256, 32, 16, 16, 6, None),
        ]
        return points + [dataclasses.replace(points[0], name="q1-ep2", ep_size=2, drop_policy="probs")]
    axes = [
        _balanced(SWEEP_EXPERTS, count, rng),
        _balanced(SWEEP_TOP_K, count, rng),
        _balanced(SWEEP_HIDDEN, count, rng),
        _balanced(SWEEP_FFN_RATIO, count, rng),
        _balanced(SWEEP_CAPACITY, count, rng),
        _balanced(SWEEP_POLICY, count, rng),
    ]
    points = []
    for i, (experts, k, hidden, ratio, cf, policy) in enumerate(zip(*axes)):
        ffn = int(hidden * ratio)
        tokens = sweep_tokens(hidden, ffn, k, cf, experts, target_s, device)
        points.append(BenchConfig(f"s{i + 1:02d}", tokens, hidden, ffn, experts, k, cf, drop_policy=policy))
    named = [dataclasses.replace(c) for c in SWEEP_NAMED]
    ep2_points = [
        dataclasses.replace(p, name=f"{p.name}-ep2", ep_size=2)
        for p in rng.sample([p for p in points if p.tokens >= 1024], ep2)
    ]
    return points + named + ep2_points


@dataclass
class SweepRow:
    cfg: BenchConfig
    timing: Timing
    peak_mib: dict[str, float]
    path: str

    def ratio(self, num: str, den: str) -> float | None:
        return self.timing.ratio(num, den)

    def fine_grained(self) -> bool:
        return self.cfg.experts >= 64 and self.cfg.top_k >= 6


def run_sweep_point(cfg: BenchConfig, warmup: int, reps: int, target: Target, memory: bool) -> SweepRow:
    """Interleaved rounds of ours, DeepSpeed, the drop-in, ``moved`` and ours' twin, all in one process
    (one per EP rank, see SWEEP_PROCESS); then the peak memory of ours, the drop-in and DeepSpeed, each
    in fresh processes (run_memory)."""
    env = SWEEP_MALLOC_ENV if target.device == "cpu" else None
    shared = Implementation(cfg, "+".join(SWEEP_PROCESS), target.for_config(cfg), env=env, wait=False)
    failed: dict[str, str] = {}
    rounds: dict[str, list[float]] = {}
    kept, ds_rows, paths = 0, 0, None
    try:
        shared.wait_ready()
        steps = {name: functools.partial(shared.step, name) for name in SWEEP_PROCESS}
        rounds = time_interleaved(steps, warmup, reps, failed)
        kept, ds_rows = shared.kept_rows, ds_buffer_rows(cfg, shared.busiest_routed)
        paths = shared.request("path")
    except RuntimeError as err:  # the process died (out of memory, a rank's error at EP=2)
        failed = {name: str(err) for name in SWEEP_PROCESS}
        rounds = {}
    finally:
        shared.close()
    peak = {}
    if memory:  # after the timing process is gone; on the path that was timed
        peak = run_memory(cfg, tuple(name for name in SWEEP_MEMORY_IMPLS if name in rounds), target, paths)
    return SweepRow(cfg, Timing(rounds, kept, failed, ds_rows, paths), peak, paths[0] if paths else "-")


def sweep_table(rows: list[SweepRow]) -> str:
    lines = [
        "| point | shape | our path | ours ms | drop-in ms | DeepSpeed ms | DS/ours | DS/drop-in | drop-in/ours "
        "| ours/moved | twin/ours | DS rows/ours | peak MiB ours | peak MiB drop-in | peak MiB DS |",
        "|---" * 15 + "|",
    ]
    for r in rows:
        # In the columns' order (ours, drop-in, DeepSpeed), whatever order the processes ran in.
        peak = ["-" if r.peak_mib.get(n) is None else _mib(r.peak_mib[n]) for n in ("ours", "compat", "deepspeed")]
        failed = f" (failed: {', '.join(sorted(r.timing.failed))})" if r.timing.failed else ""
        lines.append(
            f"| {r.cfg.name}{failed} | {r.cfg.label()} | {r.path} "
            f"| {_cell(r.timing.median_ms('ours'), '.1f')} | {_cell(r.timing.median_ms('compat'), '.1f')} "
            f"| {_cell(r.timing.median_ms('deepspeed'), '.1f')} | {_cell(r.ratio('deepspeed', 'ours'), '.2f')} "
            f"| {_cell(r.ratio('deepspeed', 'compat'), '.2f')} | {_cell(r.ratio('compat', 'ours'), '.2f')} "
            f"| {_cell(r.ratio('ours', 'moved'), '.2f')} | {_cell(r.ratio('ours_twin', 'ours'), '.2f')} "
            f"| {_cell(r.timing.padding_ratio(), '.2f')} | {peak[0]} | {peak[1]} | {peak[2]} |"
        )
    return "\n".join(lines)


def sweep_summary(rows: list[SweepRow]) -> str:
    """Min, median and worst point of each ratio, and how many points meet each target."""

    def stats(values: list[tuple[float, str]], higher_is_better: bool) -> str:
        if not values:
            return "-"
        ordered = sorted(values, reverse=not higher_is_better)
        worst = ordered[0]
        median = statistics.median(v for v, _ in values)
        lo, hi = min(v for v, _ in values), max(v for v, _ in values)
        return f"min {lo:.2f}, median {median:.2f}, max {hi:.2f}; worst {worst[0]:.2f} at {worst[1]}"

    def column(num: str, den: str, only=None) -> list[tuple[float, str]]:
        out = []
        for r in rows:
            value = r.ratio(num, den)
            if value is not None and (only is None or only(r)):
                out.append((value, r.cfg.name))
        return out

    def spread(values: list[tuple[float, str]]) -> str:
        if len(values) < 2:
            return "-"
        deciles = statistics.quantiles([v for v, _ in values], n=10)
        return f"10th-90th percentile {deciles[0]:.2f}-{deciles[-1]:.2f}"

    def count(values: list[tuple[float, str]], ok) -> str:
        return f"{sum(1 for v, _ in values if ok(v))}/{len(values)}"

    ds_ours, ds_compat = column("deepspeed", "ours"), column("deepspeed", "compat")
    fine_ours = column("deepspeed", "ours", SweepRow.fine_grained)
    fine_compat = column("deepspeed", "compat", SweepRow.fine_grained)
    compat_ours = [(v, r.cfg.name) for r in rows if (v := r.ratio("compat", "ours")) is not None]
    ours_moved = column("ours", "moved")
    twin_ours = column("ours_twin", "ours")
    padding = [(v, r.cfg.name) for r in rows if (v := r.timing.padding_ratio()) is not None]
    memory = [r for r in rows if all(n in r.peak_mib for n in SWEEP_MEMORY_IMPLS)]
    lines = [
        "| summary over the sweep | values | target met at |",
        "|---|---|---|",
        f"| DeepSpeed / ours (MoELayer) | {stats(ds_ours, True)} "
        f"| {count(ds_ours, lambda v: v >= 1.0)} points >= 1.0 |",
        f"| DeepSpeed / drop-in (compat.MoE) | {stats(ds_compat, True)} "
        f"| {count(ds_compat, lambda v: v >= 1.0)} points >= 1.0 |",
        f"| fine-grained (E >= 64, k >= 6): DeepSpeed / ours | {stats(fine_ours, True)} "
        f"| {count(fine_ours, lambda v: v >= 1.5)} points >= 1.5 |",
        f"| fine-grained: DeepSpeed / drop-in | {stats(fine_compat, True)} "
        f"| {count(fine_compat, lambda v: v >= 1.5)} points >= 1.5 |",
        f"| drop-in / ours | {stats(compat_ours, False)} | {count(compat_ours, lambda v: v <= 1.03)} points <= 1.03 |",
        f"| ours / moved | {stats(ours_moved, False)} | {count(ours_moved, lambda v: v <= 1.05)} points <= 1.05 |",
        f"| twin / ours (identical code: the run's resolution) | {stats(twin_ours, False)}; {spread(twin_ours)} "
        f"| {count(twin_ours, lambda v: abs(v - 1.0) <= 0.03)} points within 3% of 1.00 |",
        f"| DeepSpeed's expert rows / ours (DS / ours if both ran only their expert GEMMs) | {stats(padding, True)} "
        f"| {count(padding, lambda v: v >= 1.25)} points >= 1.25 |",
        f"| peak memory ours <= DeepSpeed's | - "
        f"| {sum(1 for r in memory if r.peak_mib['ours'] <= r.peak_mib['deepspeed'])}/{len(memory)} points |",
        f"| peak memory drop-in <= DeepSpeed's | - "
        f"| {sum(1 for r in memory if r.peak_mib['compat'] <= r.peak_mib['deepspeed'])}/{len(memory)} points |",
    ]
    return "\n".join(lines)


def run_sweep(args: argparse.Namespace, argv: list[str]) -> None:
    target = target_of(args)
    points = sweep_points(
        args.sweep_points, quick=args.quick, target_s=args.sweep_target_s, device=args.device, seed=args.sweep_seed
    )
    if args.sweep_only:
        wanted = {n.strip() for n in args.sweep_only.split(",")}
        points = [p for p in points if p.name in wanted]
    points = runnable_on(points, args.device)
    block = sweep_block(args.device, args.dtype, args.sweep_seed)
    rows: list[SweepRow] = []
    loads: list[float] = []
    started = time.monotonic()
    command = " ".join([".venv/bin/python benchmarks/bench_moe.py", *argv])

    def report(final: bool) -> str:
        table = sweep_table(rows) + "\n\n" + sweep_summary(rows)
        if not final:
            table = f"(partial: {len(rows)} of {len(points)} points so far)\n\n" + table
        if not args.no_write:  # after every point, so that a cut-short run still leaves its points
            load = f"1-minute load average at the points' starts: min {min(loads):.1f}, max {max(loads):.1f}"
            write_results(args.output, block, command, f"{machine_line(target)}; {load}", table)
        return table

    for i, cfg in enumerate(points):
        loads.append(os.getloadavg()[0])
        print(
            f"== [{i + 1}/{len(points)}, {time.monotonic() - started:.0f} s, load {loads[-1]:.1f}] "
            f"{cfg.name}: {cfg.label()}",
            flush=True,
        )
        rows.append(run_sweep_point(cfg, args.warmup, args.reps, target.for_config(cfg), not args.no_memory))
        print(sweep_table(rows[-1:]).splitlines()[-1], flush=True)
        if i + 1 < len(points):
            report(final=False)
    table = report(final=True)
    print("\n" + table + f"\n\nwall time {time.monotonic() - started:.0f} s")
    if args.json is not None:
        results = {
            "command": command,
            "machine": machine_line(target),
            "date": datetime.date.today().isoformat(),
            "device": args.device,
            "dtype": args.dtype,
            "seed": args.sweep_seed,
            "sweep_points": args.sweep_points,
            "markdown": table,
            "points": [sweep_row_json(r) for r in rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    if not args.no_write:
        print(f"wrote the {block} block of {args.output}")


def merge_sweeps(paths: list[Path], output: Path) -> None:
    """One sweep block from several runs' JSON (e.g. a full run and a rerun of points it lost to
    other load): a point of a later file replaces the same point of an earlier one, in sweep order."""
    runs = [json.loads(p.read_text()) for p in paths]
    # Which sample a run drew: its seed and size (absent from older files: the defaults).
    samples = {(run.get("seed", SWEEP_SEED), run.get("sweep_points", 32)) for run in runs}
    if len(samples) > 1:
        raise SystemExit(
            f"--sweep-merge: the runs sampled different points (seed, --sweep-points) {sorted(samples)}; "
            "merge runs of one sample"
        )
    seed, count = samples.pop()
    order = {p.name: i for i, p in enumerate(sweep_points(count, seed=seed))}
    points: dict[str, SweepRow] = {}
    source: dict[str, str] = {}
    for path, run in zip(paths, runs):
        for point in run["points"]:
            cfg = BenchConfig(**point["config"])
            rows = (point.get("kept_rows", 0), point.get("deepspeed_rows", 0))  # absent from older files
            timing = Timing(point["rounds_s"], rows[0], point["failed"], rows[1])
            points[cfg.name] = SweepRow(cfg, timing, point["peak_mib"], point["path"])
            source[cfg.name] = path.name
    rows = sorted(points.values(), key=lambda r: order.get(r.cfg.name, len(order)))
    commands = "; ".join(
        f"`{run['command']}` ({', '.join(n for n in source if source[n] == p.name)})" for p, run in zip(paths, runs)
    )
    table = sweep_table(rows) + "\n\n" + sweep_summary(rows)
    machine = runs[-1]["machine"] + f"; merged from {len(runs)} runs by point: {commands}"
    block = sweep_block(runs[-1]["device"], runs[-1]["dtype"], seed)
    write_results(output, block, " + ".join(run["command"] for run in runs), machine, table)
    print(table + f"\n\nwrote the {block} block of {output}")


def sweep_row_json(row: SweepRow) -> dict:
    """One sweep point's results as plain data."""
    names = SWEEP_PROCESS
    return {
        "config": dataclasses.asdict(row.cfg),
        "label": row.cfg.label(),
        "path": row.path,
        "median_ms": {n: row.timing.median_ms(n) for n in names},
        "ratios": {
            "deepspeed/ours": row.ratio("deepspeed", "ours"),
            "deepspeed/compat": row.ratio("deepspeed", "compat"),
            "compat/ours": row.ratio("compat", "ours"),
            "ours/moved": row.ratio("ours", "moved"),
            "ours_twin/ours": row.ratio("ours_twin", "ours"),
        },
        "kept_rows": row.timing.kept_rows,
        "deepspeed_rows": row.timing.deepspeed_rows,
        "peak_mib": row.peak_mib,
        "failed": row.timing.failed,
        "rounds_s": row.timing.rounds,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma-separated subset of c1,c2,c3,ep2,large (default: {DEFAULT_CONFIGS})",
    )
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions per implementation (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for EP=1 (default: torch's choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument(
        "--expert-gemm",
        choices=("auto", "grouped", "loop", "padded"),
        default="auto",
        help="our experts' path (default auto)",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None, help="default: float32 on CPU, bfloat16 on GPU"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 reps, BENCHMARKS.md left alone")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument(
        "--compat",
        choices=("auto", "on", "off", "only"),
        default="auto",
        help="the DeepSpeed drop-in rows (default auto: on, off with --quick; only: nothing else, printed only)",
    )
    parser.add_argument(
        "--tuned-malloc", action="store_true", help="rerun under TUNED_MALLOC_ENV (its own block in BENCHMARKS.md)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print a torch.profiler breakdown per config instead of timing"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="the sampled shape sweep (ours, drop-in, DeepSpeed; its own block)"
    )
    parser.add_argument(
        "--calibrate",
        type=Path,
        default=None,
        metavar="PATH",
        help="measure the expert cost model's constants here (--threads applies) and write them to PATH, "
        f"the JSON file that {choice.COST_FILE_ENV}=PATH pins",
    )
    parser.add_argument("--sweep-points", type=int, default=32, help="sampled EP=1 points of --sweep (default 32)")
    parser.add_argument(
        "--sweep-target-s",
        type=float,
        default=SWEEP_TARGET_S,
        help=f"estimated DeepSpeed step that sizes each point's T (default {SWEEP_TARGET_S})",
    )
    parser.add_argument(
        "--sweep-seed",
        type=int,
        default=SWEEP_SEED,
        help=f"seed of the sampled points (default {SWEEP_SEED}; another seed: a held-out sample, its own block)",
    )
    parser.add_argument("--sweep-only", default=None, help="comma-separated point names: run only these")
    parser.add_argument(
        "--sweep-merge",
        default=None,
        help="comma-separated --json files of sweep runs: write their points as one sweep block (a point "
        "in a later file replaces the same point in an earlier one; runs nothing)",
    )
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help=f"reference rate of the TFLOP/s columns (GPU default: {H200_BF16_TFLOPS:g}, the H200 dense bf16 GEMM)",
    )
    args = parser.parse_args(argv)
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = H200_BF16_TFLOPS
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cuda" and (args.profile or args.tuned_malloc):
        parser.error("--profile and --tuned-malloc are CPU measurements; drop them with --device cuda")
    if args.quick:
        args.reps, args.warmup, args.no_write = min(args.reps, 3), 1, True
    return args


def target_of(args: argparse.Namespace) -> Target:
    return Target(device=args.device, dtype=args.dtype, threads=args.threads, expert_gemm=args.expert_gemm)


def selected_configs(args: argparse.Namespace) -> list[BenchConfig]:
    table = QUICK_CONFIGS if args.quick else CONFIGS
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {sorted(table)}")
    return runnable_on([table[n] for n in names], device=args.device)


def runnable_on(configs: list[BenchConfig], device: str) -> list[BenchConfig]:
    """``configs`` without those this machine cannot run: on CUDA, NCCL needs one GPU per EP rank."""
    if device != "cuda":
        return configs
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    too_wide = [c.name for c in configs if c.ep_size > torch.cuda.device_count()]
    if too_wide:
        print(f"skipping {too_wide}: {torch.cuda.device_count()} GPU(s) visible, one per EP rank needed")
    return [c for c in configs if c.name not in too_wide]


def sweep_block(device: str, dtype: str, seed: int = SWEEP_SEED) -> str:
    """The sweep's results block of BENCHMARKS.md: one per device and dtype, and one per held-out seed."""
    block = "sweep" if (device, dtype) == ("cpu", "float32") else f"sweep-{device}-{dtype}"
    return block if seed == SWEEP_SEED else f"{block}-seed{seed}"


def results_block(args: argparse.Namespace) -> str:
    """Which results block of BENCHMARKS.md a run writes: one per device and dtype (and allocator)."""
    if args.tuned_malloc:
        return "tuned-malloc"
    block = "default" if (args.device, args.dtype) == ("cpu", "float32") else f"{args.device}-{args.dtype}"
    return block if args.expert_gemm == "auto" else f"{block}-{args.expert_gemm}"


def run_config(cfg: BenchConfig, args: argparse.Namespace) -> Row:
    print(f"== {cfg.name}: {cfg.label()}", flush=True)
    target = target_of(args)
    on_gpu = target.device == "cuda"
    timing, peak = run_timing(cfg, args.warmup, args.reps, target, cuda_memory=on_gpu and not args.no_memory)
    if not on_gpu and not args.no_memory:
        peak = run_memory(
            cfg, tuple(impl for impl in MEMORY_IMPLS if impl not in timing.failed), target, timing.expert_paths
        )
    row = Row(cfg, timing, peak)
    print(markdown_table([row], args.peak_tflops), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--comm" in argv:  # the communication report: benchmarks/bench_comm.py takes the other arguments
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_comm

        bench_comm.main([a for a in argv if a != "--comm"])
        return
    args = parse_args(argv)
    if args.tuned_malloc and any(os.environ.get(k) != v for k, v in TUNED_MALLOC_ENV.items()):
        # glibc reads these at start-up; the workers inherit them from this process.
        os.execve(sys.executable, [sys.executable, __file__, *argv], {**os.environ, **TUNED_MALLOC_ENV})
    if args.calibrate is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        if choice.main(["calibrate", str(args.calibrate)]) != 0:
            raise SystemExit(f"--calibrate: writing {args.calibrate} failed")
        measured = json.loads(args.calibrate.read_text())
        print(f"measured ({torch.get_num_threads()} threads): {measured}")
        print(f"defaults:                {dataclasses.asdict(choice.DEFAULT_COST_MODEL)}")
        return
    if args.sweep_merge:
        merge_sweeps([Path(p) for p in args.sweep_merge.split(",")], args.output)
        return
    if args.sweep:
        run_sweep(args, argv)
        return
    if args.profile:
        for cfg in selected_configs(args):
            print(run_profile(cfg, target_of(args)) + "\n", flush=True)
        return
    compat_rows = []
    if args.compat in ("on", "only") or (args.compat == "auto" and not args.quick):
        for cfg in selected_configs(args):
            compat_rows.append((cfg, run_compat_timing(cfg, args.warmup, args.reps, target_of(args))))
            print(compat_table(compat_rows[-1:]), flush=True)
    if args.compat == "only":
        print("\n" + compat_table(compat_rows))
        return
    rows = [run_config(cfg, args) for cfg in selected_configs(args)]
    table = markdown_table(rows, args.peak_tflops)
    if compat_rows:
        table += "\n\n" + compat_table(compat_rows)
    print("\n" + table)
    command = " ".join([".venv/bin/python benchmarks/bench_moe.py", *argv])
    if args.json is not None:
        results = {
            "command": command,
            "machine": machine_line(target_of(args)),
            "date": datetime.date.today().isoformat(),
            "device": args.device,
            "dtype": args.dtype,
            "expert_gemm": args.expert_gemm,
            "reps": args.reps,
            "warmup": args.warmup,
            "markdown": table,
            "rows": [row_json(row, args.peak_tflops) for row in rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    if not args.no_write:
        block = results_block(args)
        write_results(args.output, block, command, machine_line(target_of(args)), table)
        print(f"wrote the {block} block of {args.output}")


if __name__ == "__main__":
    main()
