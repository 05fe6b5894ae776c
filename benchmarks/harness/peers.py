"""The implementations a benchmark compares, each as one forward+backward (:class:`Step`) on one
shared :class:`Problem`: our layer defines every weight, and each peer copies the weights it needs.

- ``ours`` (and ``ours_twin``, a second copy): :class:`moe_parallel.MoELayer`, GELU experts, no bias;
- ``deepspeed``: ``deepspeed.moe.layer.MoE`` with our gate and expert weights;
- ``compat``, ``compat_module``, ``compat_parallel_mlp``: the DeepSpeed drop-in
  (``moe_parallel.integration.compat.MoE``) with DeepSpeed's expert, an expert no fast path
  recognises, and Megatron-DeepSpeed's ``ParallelMLP``;
- ``floor``: the expert GEMMs alone on the rows our router keeps, pre-gathered per expert;
- ``moved``: the floor's GEMMs plus our dispatcher's token movement on a plan fixed in advance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.harness.configs import AUX_LOSS_COEFF, BenchConfig, Target
from moe_parallel import MoEConfig, MoELayer
from moe_parallel.core.capacity import DispatchPlan
from moe_parallel.experts import GroupedExperts, grouped_mlp


@dataclass
class Problem:
    """One config's shared pieces: our layer (it defines all weights), the input and output grad."""

    cfg: BenchConfig
    layer: MoELayer
    x_TD: Tensor
    grad_TD: Tensor


def make_problem(
    cfg: BenchConfig, ep_group: dist.ProcessGroup | None = None, rank: int = 0, target: Target | None = None
) -> Problem:
    """Our layer for ``cfg`` on ``target`` (default: CPU, fp32), and this rank's input and output gradient
    (seeded per rank)."""
    target = target or Target()
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
                    # "grouped" and "auto" resolve on the next forward (resolve_path); the CPU paths are fixed here.
                    sub.resolved_gemm = None if path in ("grouped", "auto") else path

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def __call__(self) -> None:
        self.clear_grads()
        self.run()


def gelu_expert(hidden: int, ffn: int) -> nn.Module:
    """DeepSpeed's usual expert: Linear -> GELU -> Linear, no bias (our experts' form)."""
    return nn.Sequential(nn.Linear(hidden, ffn, bias=False), nn.GELU(), nn.Linear(ffn, hidden, bias=False))


def deepspeed_moe_args(
    hidden: int, experts: int, ep_size: int, top_k: int, capacity_factor: float | None
) -> dict[str, Any]:
    """Constructor arguments of DeepSpeed's ``MoE`` and of the drop-in for one shape, ``expert`` aside:
    deterministic gates (no random token selection, no sampled second expert, so that top-2 routes as
    ours does), one capacity factor in training and eval, and no dropping when dropless."""
    cf = capacity_factor or 1.0
    return dict(
        hidden_size=hidden,
        num_experts=experts,
        ep_size=ep_size,
        k=top_k,
        capacity_factor=cf,
        eval_capacity_factor=cf,
        min_capacity=4,
        drop_tokens=capacity_factor is not None,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )


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


def _aux_loss_step(moe: nn.Module, problem: Problem, modules: list[nn.Module]) -> Step:
    """The step of a DeepSpeed-style layer, which returns its aux loss apart: both losses backward."""
    x_TD = problem.x_TD.clone().requires_grad_()

    def run() -> None:
        y_TD, l_aux, _ = moe(x_TD)
        torch.autograd.backward([y_TD, l_aux], [problem.grad_TD, torch.full_like(l_aux, AUX_LOSS_COEFF)])

    return Step(run, [x_TD, *moe.parameters()], modules)


def build_deepspeed(problem: Problem) -> Step:
    """DeepSpeed's MoE layer with our gate and expert weights (so it routes exactly as we do for k=2)."""
    from deepspeed.moe.layer import MoE

    cfg, ours = problem.cfg, problem.layer
    args = deepspeed_moe_args(cfg.hidden, cfg.experts, cfg.ep_size, cfg.top_k, cfg.capacity_factor)
    moe = MoE(expert=gelu_expert(cfg.hidden, cfg.ffn), noisy_gate_policy=None, **args).train()
    moe.to(device=problem.x_TD.device, dtype=problem.x_TD.dtype)
    moe.deepspeed_moe.gate.wg.float()  # DeepSpeed's gate multiplies an fp32 copy of the input
    with contextlib.redirect_stdout(io.StringIO()):  # "No existing process group found, creating ..."
        moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for j, local in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            local[0].weight.copy_(ours.experts.w1[j].t())
            local[2].weight.copy_(ours.experts.w2[j].t())
    return _aux_loss_step(moe, problem, [])


def build_compat(problem: Problem, expert: nn.Module) -> Step:
    """The DeepSpeed drop-in (``moe_parallel.compat.MoE``) with ``expert``, DeepSpeed's deterministic
    gate settings as in :func:`build_deepspeed` and our gate weights."""
    from moe_parallel.integration.compat import MoE

    cfg = problem.cfg
    args = deepspeed_moe_args(cfg.hidden, cfg.experts, cfg.ep_size, cfg.top_k, cfg.capacity_factor)
    moe = MoE(expert=expert, **args).train()
    moe.to(device=problem.x_TD.device, dtype=problem.x_TD.dtype)
    with torch.no_grad():
        moe.router.weight.copy_(problem.layer.router.weight)
    return _aux_loss_step(moe, problem, [moe])


def build_compat_module(problem: Problem) -> Step:
    """An expert no form recognises (Linear -> tanh -> Linear): one module copy per local expert."""
    cfg = problem.cfg
    return build_compat(
        problem, nn.Sequential(nn.Linear(cfg.hidden, cfg.ffn), nn.Tanh(), nn.Linear(cfg.ffn, cfg.hidden))
    )


def build_compat_sequential(problem: Problem) -> Step:
    """DeepSpeed's own expert as in :func:`build_deepspeed` (Linear -> GELU -> Linear, no bias): a
    fast-path form, stacked and run by our experts' kernels."""
    return build_compat(problem, gelu_expert(problem.cfg.hidden, problem.cfg.ffn))


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


# The implementations of the side-by-side comparison and the profile, in their columns' order.
IMPLS = ("ours", "deepspeed", "floor", "moved")
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
