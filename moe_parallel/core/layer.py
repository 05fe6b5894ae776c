"""The MoE layer: router -> capacity plan -> dispatcher -> grouped experts -> combine."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..experts import GroupedExperts, expert_seed
from ..integration.deepspeed import check_expert_groups, expert_group_name, mark_if_deepspeed_loaded
from .aux_loss import attach_aux_loss
from .capacity import DispatchPlan, capacity_from_ratio, capacity_ratio, plan_dispatch
from .comm import ProcessGroup, group_rank, group_size
from .config import MoEConfig, MoEConfigError, MoEInputError
from .dispatcher import AllToAllTokenDispatcher
from .router import RouterOutput, TopKRouter, load_balancing_loss, router_entropy, router_z_loss

__all__ = ["MoEInputError", "MoELayer", "MoEStats", "moe_layers", "update_expert_biases"]


@dataclass
class MoEStats:
    """Statistics of the last forward of one layer, on this rank's tokens (detached)."""

    balance_loss: Tensor  # scalar, unscaled (1.0 = perfectly balanced)
    z_loss: Tensor  # scalar, unscaled
    tokens_per_expert: Tensor  # [E] int64 routed assignments, before dropping
    dropped_fraction: Tensor  # scalar: dropped assignments / routed assignments
    router_entropy: Tensor  # scalar, nats
    num_tokens: int
    capacity: int | None


class MoELayer(nn.Module):
    """Expert-parallel Mixture-of-Experts FFN.

    Args:
        config: the layer's :class:`MoEConfig`.
        ep_group: process group over which the experts are split (None: all experts local). Every
            rank of the group must call ``forward`` the same number of times.
        layer_number: position of the layer in the model; seeds the initialisation, so that
            different layers differ and any EP layout builds the same weights.
        ep_size: the expert-parallel size when the group is bound later with :meth:`set_ep_group`
            (default: the size of ``ep_group``).
        experts: a prebuilt experts module with the experts interface (``experts/interface.py``)
            holding this rank's ``num_experts // ep_size`` experts (default: ``GroupedExperts``).

    ``forward(x)`` takes ``[..., hidden_size]`` and returns the same shape. In training, the
    weighted balance loss and z-loss are attached to the output's gradient (see ``aux_loss.py``):
    do not add ``self.aux_loss`` to your loss as well, unless you built the layer with
    ``config.attach_aux_loss=False`` (then adding it is how it reaches the gradient, as with
    DeepSpeed's layer). The routing statistics of the last forward are on ``self.last_stats``.

    Parameters (names inside the layer; in a model they sit under the layer's prefix, e.g.
    ``blocks.i.ffn.``). E experts, e = E / ep_size held here (E in an EP = 1 or consolidated state
    dict; a topology-free checkpoint stores each expert's slice under its global id), D hidden size,
    F ``ffn_hidden_size``, H = 2F for ``swiglu``/``clamped_swiglu`` (columns ``[:F]`` the gate,
    ``[F:]`` the up projection) else F:

    - ``router.weight`` [E, D] and, with ``router_bias``, ``router.bias`` [E]: logits ``x W^T + b``;
    - ``experts.w1`` [e, D, H], ``experts.w2`` [e, F, D] (``x @ w``, not ``nn.Linear``'s [out, in]);
    - with ``expert_bias``: ``experts.b1`` [e, H], ``experts.b2`` [e, D]. Expert j computes
      ``y = act(x @ w1[j] + b1[j]) @ w2[j] + b2[j]``; the token's combine weight multiplies the whole
      ``y`` (b2 included), or with ``input_weighted`` scales ``x`` and ``y`` adds up unweighted;
    - the shared expert: ``shared_expert.w1`` [1, D, H_s], ``shared_expert.w2`` [1, F_s, D] (F_s =
      ``shared_expert_ffn_hidden_size``; ``b1``/``b2`` too with ``expert_bias``), ``shared_gate.weight``
      [1, D] with ``shared_expert_gate``.
    """

    def __init__(
        self,
        config: MoEConfig,
        ep_group: ProcessGroup | None = None,
        layer_number: int = 0,
        *,
        ep_size: int | None = None,
        experts: nn.Module | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        if ep_size is None or ep_group is not None:
            if ep_size is not None and ep_size != group_size(ep_group):
                raise MoEConfigError(f"ep_size={ep_size} disagrees with the size {group_size(ep_group)} of ep_group")
            ep_size = group_size(ep_group)
        elif not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
            raise MoEConfigError(f"ep_size={ep_size!r} must be a positive integer")
        if config.num_experts % ep_size != 0:
            raise MoEConfigError(
                f"moe.num_experts={config.num_experts} is not divisible by the expert-parallel size "
                f"{ep_size}: choose num_experts as a multiple of ep_size, or an ep_size that divides it"
            )
        self.config = config
        self.ep_group = ep_group
        self.ep_size = ep_size
        self.layer_number = layer_number
        self.num_experts = config.num_experts
        self.num_local_experts = config.num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)

        self.router = TopKRouter(config, seed=expert_seed(config.init_seed, layer_number, -1))
        self.dispatcher = AllToAllTokenDispatcher(config.num_experts, ep_group, config.input_weighted)
        expert_kwargs = dict(
            hidden_size=config.hidden_size,
            activation=config.activation,
            swiglu_limit=config.swiglu_limit,
            swiglu_alpha=config.swiglu_alpha,
            bias=config.expert_bias,
            init_std=config.init_std,
            output_init_std=config.output_init_std,
            expert_gemm=config.expert_gemm,
            init_seed=config.init_seed,
            layer_number=layer_number,
        )
        if experts is None:
            experts = GroupedExperts(
                self.num_local_experts,
                ffn_hidden_size=config.ffn_hidden_size,
                first_expert_id=group_rank(ep_group) * self.num_local_experts,
                **expert_kwargs,
            )
        elif getattr(experts, "num_local_experts", None) != self.num_local_experts:
            raise MoEConfigError(
                f"experts holds {getattr(experts, 'num_local_experts', None)} experts, but this rank holds "
                f"num_experts // ep_size = {self.num_local_experts}"
            )
        self.experts = experts
        # The experts' output goes to the dispatcher alone, whose backward hands them a fresh
        # gradient: they may write their input gradient over it (not so for the shared expert).
        self.experts.owns_output_grad = True
        self.shared_expert = None
        if config.shared_expert_ffn_hidden_size > 0:
            # One always-on expert, seeded with the id after the routed ones; replicated, not expert-parallel.
            self.shared_expert = GroupedExperts(
                1,
                ffn_hidden_size=config.shared_expert_ffn_hidden_size,
                first_expert_id=config.num_experts,
                **expert_kwargs,
            )
        self.shared_gate = None
        if config.shared_expert_gate:  # sigmoid(x @ w) scales the shared expert per token (Qwen2-MoE)
            self.shared_gate = nn.Linear(config.hidden_size, 1, bias=False)
            gen = torch.Generator().manual_seed(expert_seed(config.init_seed, layer_number, config.num_experts + 1))
            with torch.no_grad():
                self.shared_gate.weight.copy_(
                    torch.empty(1, config.hidden_size).normal_(0.0, config.init_std, generator=gen)
                )
        # DeepSpeed reduces parameters marked this way over the expert-data-parallel group only
        # (deepspeed.moe.utils.is_moe_param); the shared expert is replicated and reduces over DP.
        for param in self.experts.parameters():
            param.allreduce = False
            param.group_name = self.expert_group_name
        self.aux_loss: Tensor | None = None
        self.last_stats: MoEStats | None = None
        self._capacity_ratios = {f: capacity_ratio(f) for f in (config.capacity_factor, config.eval_capacity_factor)}
        mark_if_deepspeed_loaded(self)  # DeepSpeed's engine must see an MoE layer; never imports it

    def set_ep_group(self, ep_group: ProcessGroup | None) -> None:
        """Bind the expert-parallel group of a layer built with ``ep_size`` and no group (late binding).

        The group must have ``ep_size`` ranks; this rank then holds experts ``rank * local`` on. Expert
        weights are not touched: a seeded ``GroupedExperts`` built before binding was seeded as local
        experts from 0 (call ``layer.experts.reset_parameters()`` to re-seed by global id).
        """
        size = group_size(ep_group)
        if size != self.ep_size:
            raise MoEConfigError(
                f"the expert-parallel group has {size} ranks, but the layer was built for ep_size={self.ep_size}"
            )
        self.ep_group = ep_group
        self.dispatcher = AllToAllTokenDispatcher(self.num_experts, ep_group, self.config.input_weighted)
        self.experts.first_expert_id = group_rank(ep_group) * self.num_local_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, **_: object) -> None:
        """Called by ``deepspeed.initialize``: check that DeepSpeed reduces our experts over our groups."""
        check_expert_groups(self)

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.config
        if self.ep_size > 1 and self.ep_group is None:
            raise RuntimeError(
                f"MoE layer {self.layer_number} was built with ep_size={self.ep_size} but no group: call "
                "set_ep_group(group) before the first forward"
            )
        problem = self._check_input(x)
        if problem is not None:  # every rank of the group stops, after the same collective
            self.dispatcher.fail_together(problem)

        x_TD = x.reshape(-1, cfg.hidden_size)
        route, capacity, plan = self.route_and_plan(x_TD)
        self.resolve_expert_path(x_TD)
        bad_input, message = None, ""
        if cfg.check_inputs:  # a device flag: at EP > 1 it travels with the counts, no extra sync
            bad_input = (~torch.isfinite(x_TD).all()).to(torch.int64)
            message = (
                f"MoE layer {self.layer_number}: input contains NaN or Inf "
                "(set moe.check_inputs=False to skip this check)"
            )
        host_counts = self.experts.needs_host_counts(x_TD)
        dispatch = self.dispatcher.dispatch(
            x_TD,
            plan,
            host_counts=host_counts,
            bad_input=bad_input,
            bad_input_message=message,
            overlap=self.shared_expert is not None,
        )
        shared_TD = self._shared_expert_output(x_TD)  # computed while the tokens are in flight
        x_local = self.dispatcher.wait(dispatch)
        out_local = self.experts(x_local, dispatch.tokens_per_local_expert, dispatch.counts_host)
        y_TD = self.dispatcher.combine(out_local, dispatch.state)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD

        balance, z_loss = self.balance_and_z_loss(route)
        aux_loss = cfg.aux_loss_coeff * balance + cfg.z_loss_coeff * z_loss
        self.aux_loss = aux_loss  # read back from the local: compiled code must not re-read the attribute
        self.last_stats = self._stats(route, plan, balance, z_loss, capacity)
        if self.training and cfg.attach_aux_loss and torch.is_grad_enabled() and aux_loss.requires_grad:
            y_TD = attach_aux_loss(y_TD, aux_loss)
        return y_TD.view(x.shape)

    def _shared_expert_output(self, x_TD: Tensor) -> Tensor | None:
        if self.shared_expert is None:
            return None
        shared_TD = self.shared_expert(x_TD, [x_TD.shape[0]])
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        return shared_TD

    def resolve_expert_path(self, x_TD: Tensor) -> None:
        """Fix the experts' path (``experts.resolved_gemm``) for input like ``x_TD``, from the rows a
        balanced step gives each local expert (the same on every rank): a run never switches kernels
        on a timing or a count. The first forward calls it."""
        resolve = getattr(self.experts, "resolve_path", None)
        if resolve is None or getattr(self.experts, "resolved_gemm", None) is not None or torch.compiler.is_compiling():
            return
        cfg = self.config
        resolve(x_TD, -(-self.ep_size * x_TD.shape[0] * cfg.top_k // cfg.num_experts))

    def balance_and_z_loss(self, route: RouterOutput) -> tuple[Tensor, Tensor]:
        """The unscaled balance loss and z-loss of this forward's routing (a subclass whose gate
        already computed its balance loss returns that, instead of a second pass over ``[T, E]``)."""
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.config.aux_loss_coeff > 0):  # else a statistic: no backward
            balance = load_balancing_loss(route.probs_TE, route.tokens_per_expert_E, self.config.top_k)
        with torch.set_grad_enabled(grad and self.config.z_loss_coeff > 0):
            z_loss = router_z_loss(route.logits_TE)
        return balance, z_loss

    def route_and_plan(self, x_TD: Tensor) -> tuple[RouterOutput, int | None, DispatchPlan]:
        """Route ``x_TD`` and decide which assignments each expert keeps; no communication.

        Capacity comes from this rank's own token count, as in DeepSpeed: the ragged all-to-all needs
        no agreement on it. Returns the router's output, the capacity (None when dropless) and the plan.
        """
        cfg = self.config
        route = self.router(x_TD)
        factor = cfg.capacity_factor_for(self.training)
        if factor not in self._capacity_ratios:  # exact ratios, computed outside any compiled region
            self._capacity_ratios[factor] = capacity_ratio(factor)
        ratio = self._capacity_ratios[factor]
        capacity = capacity_from_ratio(x_TD.shape[0], cfg.top_k, cfg.num_experts, ratio, cfg.min_capacity)
        plan = plan_dispatch(route.expert_TK, route.weight_TK, route.tokens_per_expert_E, capacity, cfg.drop_policy)
        return route, capacity, plan

    def _check_input(self, x: Tensor) -> str | None:
        hidden = self.config.hidden_size
        if x.dim() < 1 or x.shape[-1] != hidden:
            return f"MoE layer {self.layer_number}: input shape {tuple(x.shape)} must end in hidden_size={hidden}"
        if not x.is_floating_point():
            return f"MoE layer {self.layer_number}: input dtype {x.dtype} must be floating point"
        return None

    @torch.no_grad()
    def _stats(self, route, plan, balance: Tensor, z_loss: Tensor, capacity: int | None) -> MoEStats:
        routed = route.tokens_per_expert_E.sum().clamp_min(1)
        return MoEStats(
            balance_loss=balance.detach(),
            z_loss=z_loss.detach(),
            tokens_per_expert=route.tokens_per_expert_E,
            dropped_fraction=plan.num_dropped.float() / routed.float(),
            router_entropy=router_entropy(route.probs_TE.detach()),
            num_tokens=route.expert_TK.shape[0],
            capacity=capacity,
        )

    def update_expert_bias(self, group: ProcessGroup | None = None) -> None:
        """Aux-loss-free balancing step (no-op unless ``expert_bias_update_rate > 0``)."""
        self.router.update_expert_bias(group)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model`` (or of one pipeline stage), in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def update_expert_biases(model: nn.Module, group: ProcessGroup | None = None) -> None:
    """Call once per optimizer step: updates the selection bias of every MoE layer in ``model``."""
    for layer in moe_layers(model):
        layer.update_expert_bias(group)
