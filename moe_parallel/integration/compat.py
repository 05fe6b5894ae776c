"""Drop-in replacement for ``deepspeed.moe.layer.MoE`` built on :class:`moe_parallel.MoELayer`.

``from moe_parallel.compat import MoE`` takes DeepSpeed's constructor arguments and returns what
DeepSpeed's ``forward`` returns, ``(output, l_aux, exp_counts)``, with DeepSpeed 0.19's values: its
gates (``top1gating`` / ``top2gating`` / ``topkgating``, noise and random token selection drawn from
torch's RNG in the same order), its balance loss, its counts and its combine weights. Dispatch runs
on this library's index-based path (no ``[T, E, C]`` one-hot masks, ragged all-to-all), and the
experts run as stacked weights when the expert module has a recognised form, else as one copy of the
module per local expert (see :mod:`moe_parallel.experts.modules`).

DeepSpeed's engine recognises the layer as its own MoE (``isinstance``), takes its parameters apart
as expert parameters, and saves them per expert: ``state_dict()`` has DeepSpeed's keys
(``deepspeed_moe.gate.wg.weight``, ``deepspeed_moe.experts.deepspeed_experts.<j>.<name>``), so
checkpoints and state dicts move between this layer and ``deepspeed.moe.layer.MoE`` both ways.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.capacity import DispatchPlan, keep_within_capacity
from ..core.config import MoEConfig, MoEConfigError
from ..core.layer import MoELayer
from ..core.router import RouterOutput, count_per_expert
from ..experts.modules import ModuleExperts, StackedExperts, build_module_experts
from . import deepspeed as deepspeed_integration

__all__ = ["MoE", "MoECompatError"]

# DeepSpeed's state-dict layout of one MoE layer (see deepspeed/moe/layer.py and experts.py).
DS_GATE_KEY = "deepspeed_moe.gate.wg.weight"
DS_EXPERTS_PREFIX = "deepspeed_moe.experts.deepspeed_experts"
NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")
JITTER_EPS = 1e-2  # DeepSpeed's multiplicative_jitter epsilon


class MoECompatError(MoEConfigError):
    """A DeepSpeed MoE argument is invalid or cannot be honoured; the message names it and the fix."""


class OptimizerLayoutWarning(UserWarning):
    """Expert weights were loaded from a layout whose optimizer state does not fit this layer's."""


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MoECompatError(f"MoE({name}={value!r}) is invalid: {name} must be a positive integer")


def _validate_arguments(
    hidden_size: int,
    expert: Any,
    num_experts: int,
    ep_size: int,
    k: int,
    capacity_factor: float,
    eval_capacity_factor: float,
    min_capacity: int,
    noisy_gate_policy: str | None,
    drop_tokens: bool,
    use_tutel: bool,
    enable_expert_tensor_parallelism: bool,
) -> None:
    """DeepSpeed's arguments checked under DeepSpeed's names, before anything is built or communicated."""
    for name, value in (("hidden_size", hidden_size), ("num_experts", num_experts), ("ep_size", ep_size), ("k", k)):
        _positive_int(name, value)
    if not isinstance(expert, nn.Module):
        raise MoECompatError(f"MoE(expert={type(expert).__name__}) is invalid: expert must be an nn.Module")
    if num_experts % ep_size != 0:
        raise MoECompatError(
            f"MoE(num_experts={num_experts}, ep_size={ep_size}): num_experts must be divisible by ep_size; "
            f"choose num_experts as a multiple of ep_size, or an ep_size that divides {num_experts}"
        )
    if k > num_experts:
        raise MoECompatError(
            f"MoE(k={k}, num_experts={num_experts}): each token cannot pick more experts than exist; "
            "lower k or add experts"
        )
    if drop_tokens:
        for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise MoECompatError(
                    f"MoE({name}={value!r}) is invalid: must be a positive number (or pass drop_tokens=False "
                    "for dropless routing)"
                )
    if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 0:
        raise MoECompatError(f"MoE(min_capacity={min_capacity!r}) is invalid: must be an integer >= 0")
    if noisy_gate_policy not in NOISY_GATE_POLICIES:
        raise MoECompatError(
            f"MoE(noisy_gate_policy={noisy_gate_policy!r}) is invalid: choose None, 'Jitter' or 'RSample'"
        )
    if not isinstance(use_tutel, bool):
        raise MoECompatError(f"MoE(use_tutel={use_tutel!r}) is invalid: pass True or False")
    if enable_expert_tensor_parallelism:
        raise MoECompatError(
            "MoE(enable_expert_tensor_parallelism=True) is not supported: moe_parallel does not split experts "
            "over tensor-parallel ranks; pass enable_expert_tensor_parallelism=False (the default), or use "
            "deepspeed.moe.layer.MoE for tensor-parallel experts"
        )


def _gumbel(shape: torch.Size, device: torch.device) -> Tensor:
    # DeepSpeed's gumbel_rsample: the same distribution object, so a seeded RNG gives the same noise.
    zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    # Argument validation would read device tensors on the host: a sync, and nothing to validate here.
    return torch.distributions.gumbel.Gumbel(zero, one, validate_args=False).rsample(shape)


def _uniform(low: float, high: float, shape: torch.Size, device: torch.device) -> Tensor:
    low_t, high_t = torch.tensor(low, device=device), torch.tensor(high, device=device)
    return torch.distributions.uniform.Uniform(low=low_t, high=high_t, validate_args=False).rsample(shape)


def deepspeed_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int, min_capacity: int) -> int:
    """DeepSpeed's ``_capacity``: ``max(min_capacity, ceil(T / E * (factor * k)))`` in float32, as there
    (its ``torch.tensor(capacity_factor * k)`` is float32, and the Python quotient is rounded to it);
    computed on the host, no tensor involved."""
    product = np.float32(num_tokens / num_experts) * np.float32(capacity_factor * k)
    return max(math.ceil(float(product)), min_capacity)


def deepspeed_plan(
    expert_TK: Tensor,
    gate_TK: Tensor,
    priority_TK: Tensor | None,
    tokens_per_expert_E: Tensor,
    capacity: int | None,
    used_T: Tensor | None = None,
) -> DispatchPlan:
    """Which assignments each expert keeps, and their combine weights, as DeepSpeed's gates decide.

    Inside an expert's queue: ``priority_TK`` highest first when given (k=1 with RTS: DeepSpeed's
    uniform draws; k>2: the gate values), else all first choices in token order before all second
    choices (k=2, and k=1 without RTS). At most ``capacity`` kept. For k >= 2 each token's kept gate
    values are renormalised to sum to 1 *after* dropping (a token whose second choice was dropped
    sends its first choice weight 1), as DeepSpeed does; for k=1 the weight is the gate value.
    ``used_T`` (bool, k=1): only these tokens are routed (``tokens_per_expert_E`` counts them only).
    """
    num_tokens, top_k = expert_TK.shape
    num_experts = tokens_per_expert_E.numel()
    expert_A = expert_TK.t().reshape(-1)  # assignment a = choice * T + token
    if used_T is not None:  # unused tokens go to no expert: an id past the last sorts them out
        expert_A = torch.where(used_T.repeat(top_k), expert_A, num_experts)
    priority_A = None if priority_TK is None or capacity is None else priority_TK.t().reshape(-1)
    order_A, kept_E = keep_within_capacity(expert_A, tokens_per_expert_E, capacity, priority_A)
    weight_TK = gate_TK
    if top_k > 1:
        rank_A = torch.empty_like(order_A).scatter_(0, order_A, torch.arange(order_A.numel(), device=order_A.device))
        kept_TK = (rank_A < kept_E.sum()).view(top_k, num_tokens).t()
        denom_T1 = (gate_TK * kept_TK).sum(-1, keepdim=True).clamp(min=torch.finfo(gate_TK.dtype).eps)
        weight_TK = gate_TK / denom_T1
    return DispatchPlan(
        token_idx_A=order_A % num_tokens if num_tokens > 0 else order_A,
        weight_A=weight_TK.t().reshape(-1)[order_A],
        tokens_per_expert_E=kept_E,
        routed_per_expert_E=tokens_per_expert_E,
        num_dropped=tokens_per_expert_E.sum() - kept_E.sum(),
        may_drop=capacity is not None or used_T is not None,
    )


class MoE(MoELayer):
    """Mixture-of-Experts layer with ``deepspeed.moe.layer.MoE``'s interface and values.

    Arguments are DeepSpeed's (``hidden_size, expert, num_experts=1, ep_size=1, k=1,
    capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4, use_residual=False,
    noisy_gate_policy=None, drop_tokens=True, use_rts=True, use_tutel=False,
    enable_expert_tensor_parallelism=False, top2_2nd_expert_sampling=True``) and mean what they mean
    there:

    - ``expert``: any ``nn.Module`` mapping ``[..., hidden_size]`` to the same shape (a tuple output
      counts by its first element). Every local expert starts as a copy of it. Recognised forms run as
      stacked weights, others as module copies; both give DeepSpeed's outputs and gradients.
    - ``noisy_gate_policy``, ``use_rts``, ``top2_2nd_expert_sampling``: DeepSpeed's noise, drawn from
      torch's RNG in DeepSpeed's order (Jitter and RSample in training only, RSample for k=1 only; RTS
      and the second-expert sampling also in eval, as there).
    - ``drop_tokens=False``: nothing is dropped (dropless all-to-all instead of padding to the largest load).
    - ``use_residual``: PR-MoE, ``expert`` itself being the dense branch, as DeepSpeed.
    - ``use_tutel=True`` is accepted and changes nothing, as in DeepSpeed without Tutel installed: Tutel
      only speeds up DeepSpeed's dense dispatch, which this layer does not use; the values are the same.
    - ``forward(used_token=mask)``: for k=1 only the tokens with a non-zero mask are routed (and counted
      in ``exp_counts`` and ``l_aux``), others get a zero output; k >= 2 ignores it. As DeepSpeed.
    - ``enable_expert_tensor_parallelism=True`` raises :class:`MoECompatError`.

    Where it differs: with ``k=1, use_rts=False`` and an over-full expert, DeepSpeed keeps whichever
    tokens ``torch.topk`` returns among equal mask values (unspecified, device-dependent); this layer
    keeps the first ones. Capacity comes from this rank's token count, as in DeepSpeed.

    With the same ``torch.manual_seed`` the initial weights equal those of ``deepspeed.moe.layer.MoE``
    (the gate and residual coefficient are drawn from torch's RNG in the same order). The expert groups
    are DeepSpeed's (``deepspeed.utils.groups``), taken up by ``deepspeed.initialize`` (which calls
    :meth:`set_deepspeed_parallelism`) or, outside the engine, at the first forward. With
    ``ep_size=1`` the layer also runs without any process group.
    """

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module,
        num_experts: int = 1,
        ep_size: int = 1,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        use_residual: bool = False,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        use_tutel: bool = False,
        enable_expert_tensor_parallelism: bool = False,
        top2_2nd_expert_sampling: bool = True,
    ) -> None:
        _validate_arguments(
            hidden_size=hidden_size,
            expert=expert,
            num_experts=num_experts,
            ep_size=ep_size,
            k=k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            noisy_gate_policy=noisy_gate_policy,
            drop_tokens=drop_tokens,
            use_tutel=use_tutel,
            enable_expert_tensor_parallelism=enable_expert_tensor_parallelism,
        )
        num_local_experts = num_experts // ep_size
        experts = build_module_experts(expert, hidden_size, num_local_experts)
        # DeepSpeed's gate is nn.Linear(hidden, E, bias=False), drawn from torch's global RNG after the
        # expert copies (which draw nothing): drawn the same way, a seeded model starts as DeepSpeed's.
        gate_weight_ED = nn.Linear(hidden_size, num_experts, bias=False).weight.detach()
        native = isinstance(experts, StackedExperts) and experts.form.native
        config = MoEConfig(
            hidden_size=hidden_size,
            # Descriptive only: the experts are given, not built from the config.
            ffn_hidden_size=experts.w2.shape[1] if native else hidden_size,
            num_experts=num_experts,
            top_k=k,
            capacity_factor=float(capacity_factor) if drop_tokens else None,
            eval_capacity_factor=float(eval_capacity_factor) if drop_tokens else None,
            min_capacity=min_capacity,
            aux_loss_coeff=1.0,  # l_aux is returned raw; the user scales it, as with DeepSpeed
            z_loss_coeff=0.0,
            activation=experts.activation if native else "gelu",  # type: ignore[arg-type]
            attach_aux_loss=False,
        )
        super().__init__(config, ep_size=ep_size, experts=experts)
        with torch.no_grad():
            self.router.weight.copy_(gate_weight_ED)

        # What DeepSpeed's engine, checkpointing and profiler read from an MoE module.
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = enable_expert_tensor_parallelism
        self.hidden_size = hidden_size
        self.k = k
        self.noisy_gate_policy = noisy_gate_policy
        self.drop_tokens = drop_tokens
        self.use_tutel = use_tutel
        self.use_rts = use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling
        self._l_aux: Tensor | None = None
        self._used_token: Tensor | None = None
        if use_residual:
            # PR-MoE exactly as DeepSpeed: the given expert itself is the dense branch, and a
            # Linear(hidden, 2) gives the softmax mixing coefficients (created after the gate, as there).
            self.mlp = expert
            self.coefficient = nn.Linear(hidden_size, 2)

        self.register_state_dict_post_hook(_state_dict_to_deepspeed_layout)
        self.register_load_state_dict_pre_hook(_state_dict_from_deepspeed_layout)
        deepspeed_integration.mark_as_deepspeed_moe(self)

    # -- parallel groups ---------------------------------------------------------------------------

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, **_: object) -> None:
        """Create (or reuse) DeepSpeed's expert groups and use them; ``deepspeed.initialize`` calls this."""
        self._create_process_groups(use_data_before_expert_parallel_=use_data_before_expert_parallel_)

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        try:
            group = deepspeed_integration.deepspeed_expert_group(self.ep_size, use_data_before_expert_parallel_)
        except deepspeed_integration.ExpertGroupError as exc:
            raise MoECompatError(str(exc)) from None
        self.set_ep_group(group)

    # -- gate --------------------------------------------------------------------------------------

    def route_and_plan(self, x_TD: Tensor) -> tuple[RouterOutput, int | None, DispatchPlan]:
        """DeepSpeed's gate on ``x_TD`` (``TopKGate.forward`` and ``top1/top2/topkgating``); no communication.

        Also computes DeepSpeed's ``l_aux`` (kept for :meth:`forward`). Capacity comes from this
        rank's tokens, as in DeepSpeed.
        """
        k, num_experts = self.k, self.num_experts
        training = self.training
        with torch.autocast(device_type=x_TD.device.type, enabled=False):  # the gate runs in fp32
            x32_TD = x_TD.float()
            if self.noisy_gate_policy == "Jitter" and training:
                x32_TD = x32_TD * _uniform(1.0 - JITTER_EPS, 1.0 + JITTER_EPS, x32_TD.shape, x32_TD.device)
            logits_TE = F.linear(x32_TD, self.router.weight.float())
            gates_TE = F.softmax(logits_TE, dim=1)
            num_tokens = gates_TE.shape[0]
            priority_TK = None
            if k == 1:
                noisy = self.noisy_gate_policy == "RSample" and training
                selection_TE = logits_TE + _gumbel(logits_TE.shape, logits_TE.device) if noisy else gates_TE
                expert_TK = torch.argmax(selection_TE, dim=1, keepdim=True)
                if self.use_rts:  # drawn whenever use_rts, also when nothing can drop, as DeepSpeed does
                    priority_TK = _uniform(0.0, 1.0, gates_TE.shape, gates_TE.device).gather(1, expert_TK)
                used_T = None if self._used_token is None else self._used_token.reshape(-1) != 0
                first_T = expert_TK[:, 0]
                if used_T is not None:  # unused tokens count nowhere
                    first_T = torch.where(used_T, first_T, num_experts)
                first_E = count_per_expert(first_T, num_experts + 1)[:num_experts]
            elif k == 2:
                first_T = torch.argmax(gates_TE, dim=1)
                second_logits_TE = logits_TE.detach()
                if self.top2_2nd_expert_sampling:
                    second_logits_TE = second_logits_TE + _gumbel(logits_TE.shape, logits_TE.device)
                # A scatter, not F.one_hot, which reads the ids' range on the host.
                first_mask_TE = torch.zeros_like(gates_TE, dtype=torch.bool).scatter_(1, first_T.unsqueeze(1), True)
                second_T = torch.argmax(second_logits_TE.masked_fill(first_mask_TE, float("-inf")), dim=1)
                expert_TK = torch.stack([first_T, second_T], dim=1)
                first_E = count_per_expert(first_T, num_experts)
            else:
                expert_TK = torch.topk(gates_TE, k=k, dim=1).indices
                priority_TK = gates_TE.detach().gather(1, expert_TK)  # DeepSpeed's drop_policy="probs"
            tokens_per_expert_E = first_E if k == 1 else count_per_expert(expert_TK, num_experts)

            if num_tokens == 0:
                self._l_aux = gates_TE.sum() * 0.0
            else:
                # DeepSpeed's formulas, term for term (k <= 2 balances first choices only).
                mean_prob_E = gates_TE.mean(dim=0)
                if k == 1:
                    self._l_aux = torch.sum(mean_prob_E * (first_E.float() / num_tokens)) * num_experts
                elif k == 2:
                    self._l_aux = torch.mean(mean_prob_E * (first_E.float() / num_tokens)) * num_experts * num_experts
                else:
                    mean_mask_E = tokens_per_expert_E.float() / num_tokens
                    self._l_aux = torch.mean(mean_prob_E * mean_mask_E) * num_experts * num_experts / k

            factor = self.config.capacity_factor_for(training)
            capacity = None
            if factor is not None:
                capacity = deepspeed_capacity(num_tokens, num_experts, factor, k, self.config.min_capacity)
            gate_TK = gates_TE.gather(1, expert_TK)
            # DeepSpeed's top1gating routes the used tokens only.
            plan = deepspeed_plan(
                expert_TK, gate_TK, priority_TK, tokens_per_expert_E, capacity, used_T if k == 1 else None
            )
        route = RouterOutput(expert_TK, gate_TK, gates_TE, logits_TE, tokens_per_expert_E)
        return route, capacity, plan

    def balance_and_z_loss(self, route: RouterOutput) -> tuple[Tensor, Tensor]:
        """DeepSpeed's ``l_aux``, computed by the gate above from its own counts; no z-loss (as DeepSpeed)."""
        return self._l_aux, self._l_aux.new_zeros(())

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, hidden_states: Tensor, used_token: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Route ``hidden_states`` (``[..., hidden_size]``) through the experts.

        Returns ``(output, l_aux, exp_counts)`` like DeepSpeed: the output in the input's shape, the
        unscaled balance loss (a differentiable fp32 scalar: add ``coeff * l_aux`` to your loss) and
        the int64 number of routed (token, choice) assignments per expert ``[num_experts]``, before
        capacity dropping.
        """
        if used_token is not None:
            num_tokens = hidden_states.numel() // max(1, hidden_states.shape[-1]) if hidden_states.dim() else 0
            if not isinstance(used_token, Tensor) or used_token.numel() != num_tokens:
                got = tuple(used_token.shape) if isinstance(used_token, Tensor) else type(used_token).__name__
                raise MoECompatError(
                    f"MoE.forward(used_token={got}) is invalid: give one value per token ({num_tokens} here, "
                    "non-zero = used), or None"
                )
        if self.ep_size > 1 and self.ep_group is None:
            self._create_process_groups()
        self._used_token = used_token if self.k == 1 else None  # DeepSpeed's top-2/top-k gates ignore it
        try:
            output = super().forward(hidden_states)
        finally:
            self._used_token = None
        l_aux = self._l_aux
        self.aux_loss = l_aux
        exp_counts_E = self.last_stats.tokens_per_expert
        if self.k == 1 and used_token is not None:  # DeepSpeed's einsum with the mask promotes the counts
            exp_counts_E = exp_counts_E.to(torch.promote_types(used_token.dtype, torch.int64))
        if self.use_residual:
            # Residual MoE, as deepspeed.moe.layer.MoE.forward.
            output_mlp = self.mlp(hidden_states)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        return output, l_aux, exp_counts_E

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, ep_size={self.ep_size}, k={self.k}, "
            f"group={self.expert_group_name!r}, residual={self.use_residual}"
        )


# -- state dict in DeepSpeed's layout ----------------------------------------------------------------

_TRANSPOSED = ("w1", "w2")  # stacked [e, in, out]; DeepSpeed's Linear weights are [out, in]
_LAYOUT_KEY = "moe_parallel"


def _layout_of(module: MoE) -> str:
    # DeepSpeed's own layer keeps module copies: its optimizer layout is ModuleExperts'.
    return "module" if isinstance(module.experts, ModuleExperts) else "stacked"


def _warn_if_optimizer_state_cannot_fit(module: MoE, written: dict[str, Any] | None, prefix: str) -> None:
    """Weights load exactly from any layout and EP size; optimizer state (ZeRO's flat partitions, Adam's
    moments) only fits the layout and EP size that wrote it, and DeepSpeed would map it silently."""
    written_layout = "module" if written is None else written.get("experts")  # None: DeepSpeed's own layer
    written_ep = None if written is None else written.get("ep_size")
    problems = []
    if written_layout != _layout_of(module):
        source = "deepspeed.moe.layer.MoE (or module-copy experts)" if written_layout == "module" else "stacked experts"
        problems.append(f"the expert weights were written by {source}, this layer holds {_layout_of(module)} experts")
    if written_ep is not None and written_ep != module.ep_size:
        problems.append(f"they were written at ep_size={written_ep}, this layer has ep_size={module.ep_size}")
    if problems:
        warnings.warn(
            f"MoE layer {prefix.rstrip('.') or '<root>'}: {'; '.join(problems)}. The weights load exactly, but "
            "an optimizer state saved with them does not fit this layer: resume a DeepSpeed engine checkpoint "
            "with engine.load_checkpoint(..., load_module_only=True) (a fresh optimizer state), or keep the "
            "expert form and ep_size of the run that wrote it",
            OptimizerLayoutWarning,
            stacklevel=3,
        )


def _state_dict_to_deepspeed_layout(
    module: MoE, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    # Per-expert keys with local ids: what DeepSpeed's engine splits into one checkpoint file per
    # global expert, and what deepspeed.moe.layer.MoE loads.
    gate_key = f"{prefix}router.weight"
    if gate_key in state_dict:
        state_dict[prefix + DS_GATE_KEY] = state_dict.pop(gate_key)
    experts = module.experts
    # Which parameter layout wrote this (saved with the checkpoint): decides whether optimizer state fits.
    local_metadata[_LAYOUT_KEY] = {"experts": _layout_of(module), "ep_size": module.ep_size}
    if isinstance(experts, ModuleExperts):
        ours, theirs = f"{prefix}experts.deepspeed_experts.", f"{prefix}{DS_EXPERTS_PREFIX}."
        for key in [key for key in state_dict if key.startswith(ours)]:
            state_dict[theirs + key[len(ours) :]] = state_dict.pop(key)
        return
    for name, ds_name in experts.deepspeed_names().items():
        value = state_dict.pop(f"{prefix}experts.{name}", None)
        if value is None:
            continue
        for j in range(module.num_local_experts):
            # A copy, not a view: torch.save writes a view's whole storage (every expert) into each file.
            value_j = value.detach()[j]
            state_dict[f"{prefix}{DS_EXPERTS_PREFIX}.{j}.{ds_name}"] = (
                value_j.t().contiguous() if name in _TRANSPOSED else value_j.clone()
            )


def _state_dict_from_deepspeed_layout(
    module: MoE,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    # Accept DeepSpeed's layout (what state_dict() writes) as well as the internal one (what
    # named_parameters() uses). Incomplete DeepSpeed layouts are left as they are, so strict loading
    # reports the exact missing and unexpected keys.
    gate_key = prefix + DS_GATE_KEY
    if gate_key in state_dict:
        state_dict[f"{prefix}router.weight"] = state_dict.pop(gate_key)
    if any(key.startswith(f"{prefix}{DS_EXPERTS_PREFIX}.") for key in state_dict):
        _warn_if_optimizer_state_cannot_fit(module, local_metadata.get(_LAYOUT_KEY), prefix)
    experts = module.experts
    if isinstance(experts, ModuleExperts):
        theirs, ours = f"{prefix}{DS_EXPERTS_PREFIX}.", f"{prefix}experts.deepspeed_experts."
        for key in [key for key in state_dict if key.startswith(theirs)]:
            state_dict[ours + key[len(theirs) :]] = state_dict.pop(key)
        return
    names = experts.deepspeed_names()
    keys = {
        name: [f"{prefix}{DS_EXPERTS_PREFIX}.{j}.{ds_name}" for j in range(module.num_local_experts)]
        for name, ds_name in names.items()
    }
    if not all(key in state_dict for per_expert in keys.values() for key in per_expert):
        return
    for name, per_expert in keys.items():
        slices = [state_dict.pop(key) for key in per_expert]
        if name in _TRANSPOSED:
            slices = [s.t() for s in slices]
        state_dict[f"{prefix}experts.{name}"] = torch.stack(slices)
