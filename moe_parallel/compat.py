"""Drop-in replacement for ``deepspeed.moe.layer.MoE`` built on :class:`moe_parallel.MoELayer`.

``from moe_parallel.compat import MoE`` takes DeepSpeed's constructor arguments and returns what
DeepSpeed's ``forward`` returns, ``(output, l_aux, exp_counts)``, while routing, dispatch and experts
run on this library's index-based path (no ``[T, E, C]`` one-hot masks, grouped expert matmuls).

DeepSpeed's engine recognises the layer as its own MoE: the class is a ``deepspeed.moe.layer.MoE``
(the engine checks ``isinstance``) without running DeepSpeed's ``__init__``, carries the attributes the
engine, its checkpointing and its profiler read, takes its expert-parallel group from
``deepspeed.utils.groups`` (creating the groups as DeepSpeed does when they are missing) and marks the
expert parameters ``allreduce=False`` with ``group_name``, so that the engine and ZeRO reduce them over
the expert-data-parallel group. ``state_dict()`` uses DeepSpeed's key layout
(``deepspeed_moe.gate.wg.weight``, ``deepspeed_moe.experts.deepspeed_experts.<j>.<linear>.weight``), so
``engine.save_checkpoint`` / ``load_checkpoint`` work and state dicts move between this layer and
``deepspeed.moe.layer.MoE`` in both directions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_pipeline_parallel_world_size, bwc_tensor_model_parallel_world_size
from torch import Tensor, nn

from .comm import ProcessGroup, group_rank, group_size
from .config import MoEConfig, MoEConfigError
from .dispatcher import AllToAllTokenDispatcher
from .experts import GroupedExperts
from .layer import MoELayer

__all__ = ["MoE", "MoECompatError", "UnsupportedExpertError"]

# DeepSpeed's state-dict layout of one MoE layer (see deepspeed/moe/layer.py and experts.py).
DS_GATE_KEY = "deepspeed_moe.gate.wg.weight"
DS_EXPERTS_PREFIX = "deepspeed_moe.experts.deepspeed_experts"

_NOISY_GATE_POLICIES = {None: "none", "None": "none", "Jitter": "jitter", "RSample": "gumbel"}

_SUPPORTED_EXPERTS = (
    "Supported experts compute Linear(hidden_size, F) -> activation -> Linear(F, hidden_size) and "
    "nothing else, e.g. nn.Sequential(nn.Linear(h, f), nn.GELU(), nn.Linear(f, h)) or a module whose "
    "forward is `return self.fc2(F.gelu(self.fc1(x)))`. The activation is nn.GELU() (exact, "
    "approximate='none'), nn.ReLU() or nn.SiLU(), or the functional F.gelu / F.relu / F.silu / "
    "torch.relu; the two Linears are plain nn.Linear, both with bias or both without, same dtype and "
    "device. For any other expert use deepspeed.moe.layer.MoE."
)


class MoECompatError(MoEConfigError):
    """A DeepSpeed MoE argument is invalid or cannot be honoured; the message names it and the fix."""


class UnsupportedExpertError(MoECompatError):
    """The ``expert`` module cannot be converted to grouped experts; the message lists what can."""


@dataclass(frozen=True)
class ExpertStructure:
    """The Linear -> activation -> Linear found in a user's expert module."""

    fc1_name: str  # name of the first Linear inside the expert (its state-dict prefix)
    fc2_name: str
    fc1: nn.Linear
    fc2: nn.Linear
    activation: str  # one of "gelu", "relu", "silu" (moe_parallel's names)

    @property
    def ffn_hidden_size(self) -> int:
        return self.fc1.out_features

    @property
    def bias(self) -> bool:
        return self.fc1.bias is not None


def _activation_of_module(module: nn.Module) -> str | None:
    if type(module) is nn.GELU:
        return "gelu" if module.approximate == "none" else None
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.SiLU:
        return "silu"
    return None


# Functional forms as torch.fx records them; extra arguments are checked in _activation_of_node.
_FUNCTIONAL_ACTIVATIONS: dict[Any, str] = {
    F.gelu: "gelu",
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.silu: "silu",
}
_METHOD_ACTIVATIONS = {"relu": "relu", "relu_": "relu"}


def _activation_of_node(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The activation a traced node applies to its single tensor input, or None if it is no activation."""
    if node.op == "call_module":
        return _activation_of_module(modules[node.target])
    if node.op == "call_function" and node.target in _FUNCTIONAL_ACTIVATIONS:
        name = _FUNCTIONAL_ACTIVATIONS[node.target]
        extra_args = node.args[1:]
        if name == "gelu":
            approximate = node.kwargs.get("approximate", extra_args[0] if extra_args else "none")
            return "gelu" if approximate == "none" and len(extra_args) <= 1 else None
        # relu/silu may carry `inplace` (positional or keyword): it does not change the result.
        return name if len(extra_args) <= 1 and set(node.kwargs) <= {"inplace"} else None
    if node.op == "call_method" and node.target in _METHOD_ACTIVATIONS:
        return _METHOD_ACTIVATIONS[node.target] if len(node.args) == 1 and not node.kwargs else None
    return None


def analyse_expert(expert: nn.Module, hidden_size: int) -> ExpertStructure:
    """Find Linear -> activation -> Linear in ``expert`` or raise :class:`UnsupportedExpertError`.

    The expert is traced with ``torch.fx``, so ``nn.Sequential`` and custom modules with a plain
    ``forward`` are read the same way, and anything computed besides the three steps is noticed
    instead of silently dropped.
    """

    def unsupported(reason: str) -> UnsupportedExpertError:
        return UnsupportedExpertError(
            f"moe_parallel.compat.MoE cannot convert expert={type(expert).__name__} to grouped experts: "
            f"{reason}. {_SUPPORTED_EXPERTS}"
        )

    if not isinstance(expert, nn.Module):
        raise unsupported(f"expert must be an nn.Module, got {type(expert).__name__}")
    try:
        traced = torch.fx.symbolic_trace(expert)
    except Exception as exc:  # fx raises many types on untraceable code; all mean "not convertible"
        raise unsupported(f"its forward cannot be traced with torch.fx ({type(exc).__name__}: {exc})") from exc

    modules = dict(traced.named_modules())
    nodes = list(traced.graph.nodes)
    ops = [node.op for node in nodes]
    if len(nodes) != 5 or ops[0] != "placeholder" or ops[-1] != "output":
        found = ", ".join(f"{n.op}:{n.target}" for n in nodes)
        raise unsupported(f"its forward is not exactly one input -> Linear -> activation -> Linear (found {found})")
    x_node, fc1_node, act_node, fc2_node, out_node = nodes

    linears: list[tuple[str, nn.Linear]] = []
    for node, source in ((fc1_node, x_node), (fc2_node, act_node)):
        module = modules.get(node.target) if node.op == "call_module" else None
        if type(module) is not nn.Linear:
            what = type(module).__name__ if module is not None else f"{node.op} {node.target}"
            raise unsupported(f"step {node.name!r} is {what}, not a plain nn.Linear")
        if node.args != (source,) or node.kwargs:
            raise unsupported(f"Linear {node.target!r} does not take the previous step's output as its only input")
        linears.append((str(node.target), module))
    (fc1_name, fc1), (fc2_name, fc2) = linears

    activation = _activation_of_node(act_node, modules)
    if activation is None or not act_node.args or act_node.args[0] is not fc1_node:
        raise unsupported(f"the middle step {act_node.op} {act_node.target} is not a supported activation of fc1")
    if out_node.args != (fc2_node,):
        raise unsupported("its output is not the second Linear's output alone")
    if fc1 is fc2:
        raise unsupported("both steps use the same Linear (tied weights)")
    if fc1.in_features != hidden_size or fc2.out_features != hidden_size:
        raise unsupported(
            f"its Linears map {fc1.in_features} -> {fc1.out_features} -> {fc2.out_features}, but "
            f"hidden_size={hidden_size} must be both the input and the output size"
        )
    if fc1.out_features != fc2.in_features:
        raise unsupported(f"{fc1_name}.out_features={fc1.out_features} != {fc2_name}.in_features={fc2.in_features}")
    if (fc1.bias is None) != (fc2.bias is None):
        raise unsupported(f"one Linear has a bias and the other has none ({fc1_name}, {fc2_name})")
    if fc1.weight.dtype != fc2.weight.dtype or fc1.weight.device != fc2.weight.device:
        raise unsupported("its two Linears differ in dtype or device")
    own = {id(t) for t in (*fc1.parameters(), *fc2.parameters(), *fc1.buffers(), *fc2.buffers())}
    others = [n for n, t in (*expert.named_parameters(), *expert.named_buffers()) if id(t) not in own]
    if others:
        raise unsupported(f"it holds parameters or buffers besides its two Linears ({', '.join(others)})")
    return ExpertStructure(fc1_name, fc2_name, fc1, fc2, activation)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MoECompatError(f"MoE({name}={value!r}) is invalid: {name} must be a positive integer")


def _validate_arguments(
    hidden_size: int,
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
    if noisy_gate_policy not in _NOISY_GATE_POLICIES:
        raise MoECompatError(
            f"MoE(noisy_gate_policy={noisy_gate_policy!r}) is invalid: choose None, 'Jitter' or 'RSample'"
        )
    if use_tutel:
        raise MoECompatError(
            "MoE(use_tutel=True) is not supported: moe_parallel dispatches with index-based sort/gather and a "
            "ragged all-to-all, so Tutel's kernels have nothing to replace; pass use_tutel=False (the default)"
        )
    if enable_expert_tensor_parallelism:
        raise MoECompatError(
            "MoE(enable_expert_tensor_parallelism=True) is not supported: moe_parallel does not split experts "
            "over tensor-parallel ranks; pass enable_expert_tensor_parallelism=False (the default), or use "
            "deepspeed.moe.layer.MoE for tensor-parallel experts"
        )


def _drop_policy(k: int, use_rts: bool) -> str:
    # DeepSpeed keeps, per expert: k=1 a random subset (RTS) or, without RTS, the first tokens;
    # k=2 first choices before second choices, in token order; k>2 the highest gate values.
    # moe_parallel has no random selection: RTS becomes "probs", which like RTS has no bias
    # towards early tokens in the batch.
    if k == 1:
        return "probs" if use_rts else "position"
    return "position" if k == 2 else "probs"


class _DeepSpeedMoEMarker(DeepSpeedMoE):
    """``deepspeed.moe.layer.MoE`` as a pure ``isinstance`` marker for DeepSpeed's engine.

    Its ``__init__`` (which would build DeepSpeed's own gate and expert copies) is replaced by
    ``nn.Module.__init__``; it sits after :class:`MoELayer` in the MRO so that ``MoELayer.__init__``'s
    ``super().__init__()`` ends here.
    """

    def __init__(self) -> None:
        nn.Module.__init__(self)


class MoE(MoELayer, _DeepSpeedMoEMarker):
    """Mixture-of-Experts layer with ``deepspeed.moe.layer.MoE``'s interface on moe_parallel's engine.

    Arguments are DeepSpeed's (``hidden_size, expert, num_experts=1, ep_size=1, k=1,
    capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4, use_residual=False,
    noisy_gate_policy=None, drop_tokens=True, use_rts=True, use_tutel=False,
    enable_expert_tensor_parallelism=False, top2_2nd_expert_sampling=True``) and mean what they mean
    there, with these differences:

    - ``expert`` must be Linear -> GELU/ReLU/SiLU -> Linear (see :func:`analyse_expert`); it is turned
      into grouped experts whose every slot starts as a copy of ``expert``, as DeepSpeed deep-copies it.
    - ``drop_tokens=False`` is dropless routing (ragged all-to-all), not a capacity padded to the
      largest expert load.
    - ``noisy_gate_policy``: 'Jitter' is the same multiplicative input jitter; 'RSample' adds Gumbel
      noise to the selection of every choice, also for k >= 2 (DeepSpeed applies it for k=1 only).
    - ``use_rts=True`` (k=1) keeps the highest-probability tokens of an over-full expert instead of a
      random subset; ``use_rts=False`` keeps the first ones, as DeepSpeed does.
    - ``top2_2nd_expert_sampling=True`` cannot be honoured (the second choice is the deterministic
      second best); a warning says so, ``top2_2nd_expert_sampling=False`` is exact. DeepSpeed samples
      the second expert in eval mode too.
    - ``l_aux`` is the balance loss ``E * sum_e f_e * P_e`` over all k choices: DeepSpeed's value for
      k=1 and k>2; for k=2 DeepSpeed counts first choices only.
    - ``use_tutel=True``, ``enable_expert_tensor_parallelism=True`` and ``forward(used_token=...)``
      raise :class:`MoECompatError`.

    With the same ``torch.manual_seed`` the initial weights equal those of ``deepspeed.moe.layer.MoE``
    (the gate and residual coefficient are drawn from torch's RNG in the same order), and
    ``state_dict()`` has DeepSpeed's keys.

    The expert-parallel groups are DeepSpeed's (``deepspeed.utils.groups``, named
    ``f"ep_size_{ep_size}"``; groups registered there beforehand, e.g. by
    ``moe_parallel.parallel.initialize_parallel``, are reused). They are taken up by
    ``deepspeed.initialize`` (which calls :meth:`set_deepspeed_parallelism`) or, outside the engine, at
    the first forward once torch.distributed is initialised. With ``ep_size=1`` the layer also runs
    without any process group.

    The layer is a :class:`moe_parallel.MoELayer` (``aux_loss``, ``last_stats``, ``router``,
    ``experts``) whose ``forward`` returns DeepSpeed's tuple.
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
        structure = analyse_expert(expert, hidden_size)
        if k == 2 and top2_2nd_expert_sampling:
            warnings.warn(
                "moe_parallel.compat.MoE(k=2, top2_2nd_expert_sampling=True): the second expert is the "
                "deterministic second best, not sampled with Gumbel noise as in DeepSpeed; pass "
                "top2_2nd_expert_sampling=False to make this explicit (and silence this warning)",
                UserWarning,
                stacklevel=2,
            )
        config = MoEConfig(
            hidden_size=hidden_size,
            ffn_hidden_size=structure.ffn_hidden_size,
            num_experts=num_experts,
            top_k=k,
            score_func="softmax",
            normalize_top_k=True,  # DeepSpeed renormalises the k gate values (k >= 2)
            router_noise=_NOISY_GATE_POLICIES[noisy_gate_policy],  # type: ignore[arg-type]
            router_jitter_eps=1e-2,  # DeepSpeed's multiplicative_jitter epsilon
            capacity_factor=float(capacity_factor) if drop_tokens else None,
            eval_capacity_factor=float(eval_capacity_factor) if drop_tokens else None,
            min_capacity=min_capacity,
            drop_policy=_drop_policy(k, use_rts),  # type: ignore[arg-type]
            aux_loss_coeff=1.0,  # l_aux is returned raw; the user scales it, as with DeepSpeed
            z_loss_coeff=0.0,
            activation=structure.activation,  # type: ignore[arg-type]
            expert_bias=structure.bias,
            attach_aux_loss=False,
        )
        # DeepSpeed's gate is nn.Linear(hidden, E, bias=False) initialised from torch's global RNG:
        # drawing it the same way keeps a seeded model's initial weights identical to DeepSpeed's.
        gate_weight_ED = nn.Linear(hidden_size, num_experts, bias=False).weight.detach()
        num_local_experts = num_experts // ep_size

        # Build on the meta device: the expert weights are copies of `expert`, so the seeded init
        # would be thrown away, and without the EP group MoELayer would size *all* experts locally.
        with torch.device("meta"):
            MoELayer.__init__(self, config)
            if num_local_experts != num_experts:
                self.experts = GroupedExperts(
                    num_local_experts,
                    hidden_size=hidden_size,
                    ffn_hidden_size=config.ffn_hidden_size,
                    activation=config.activation,
                    bias=config.expert_bias,
                    init_std=config.init_std,
                    init_seed=config.init_seed,
                )
        weight = structure.fc1.weight
        self.to_empty(device=weight.device)
        self.experts.to(dtype=weight.dtype)
        with torch.no_grad():
            self.router.weight.copy_(gate_weight_ED)
            experts = self.experts
            # Every slot is the given expert, as DeepSpeed's deepcopy per local expert.
            experts.w1.copy_(structure.fc1.weight.detach().t().expand_as(experts.w1))
            experts.w2.copy_(structure.fc2.weight.detach().t().expand_as(experts.w2))
            if config.expert_bias:
                experts.b1.copy_(structure.fc1.bias.detach().expand_as(experts.b1))
                experts.b2.copy_(structure.fc2.bias.detach().expand_as(experts.b2))

        # What DeepSpeed's engine, checkpointing and profiler read from an MoE module. ep_size is the
        # requested size; MoELayer uses it as the group's size, which it is once the group is bound
        # (forward binds it before any collective).
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = enable_expert_tensor_parallelism
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = num_local_experts
        self.hidden_size = hidden_size
        self.k = k
        self.expert_fc1_name = structure.fc1_name
        self.expert_fc2_name = structure.fc2_name
        self._ep_group_bound = False
        for param in experts.parameters():
            # DeepSpeed's engine and ZeRO reduce these over the expert-data-parallel group only.
            param.allreduce = False
            param.group_name = self.expert_group_name

        if use_residual:
            # PR-MoE exactly as DeepSpeed: the given expert itself is the dense branch, and a
            # Linear(hidden, 2) gives the softmax mixing coefficients (created after the gate, as there).
            self.mlp = expert
            self.coefficient = nn.Linear(hidden_size, 2)

        self.register_state_dict_post_hook(_state_dict_to_deepspeed_layout)
        self.register_load_state_dict_pre_hook(_state_dict_from_deepspeed_layout)

    # -- parallel groups ---------------------------------------------------------------------------

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Create (or reuse) DeepSpeed's expert groups and use them; ``deepspeed.initialize`` calls this."""
        self._create_process_groups(use_data_before_expert_parallel_=use_data_before_expert_parallel_)

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        import deepspeed.comm as ds_comm

        if not ds_comm.is_initialized():
            if not torch.distributed.is_initialized():
                raise MoECompatError(
                    f"MoE(ep_size={self.ep_size}) needs torch.distributed to create its expert-parallel "
                    "groups: call deepspeed.init_distributed() (or deepspeed.initialize) before the first "
                    "forward, or use ep_size=1"
                )
            # torch.distributed was initialised by the user: let deepspeed.comm wrap it, as
            # deepspeed.initialize would.
            ds_comm.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
        if bwc_tensor_model_parallel_world_size(groups.mpu) > 1:
            raise MoECompatError(
                "moe_parallel.compat.MoE does not support tensor-parallel non-expert layers (an mpu with "
                "tensor-parallel size > 1 is registered with DeepSpeed): tokens would be duplicated over "
                "the tensor-parallel ranks; use deepspeed.moe.layer.MoE there"
            )
        world_size = ds_comm.get_world_size()
        stage_size = world_size // bwc_pipeline_parallel_world_size(groups.mpu)
        if stage_size % self.ep_size != 0:
            raise MoECompatError(
                f"MoE(ep_size={self.ep_size}) does not divide the {stage_size} ranks of a pipeline stage "
                f"(world size {world_size}): choose an ep_size that divides {stage_size}, or change the "
                "number of processes"
            )
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_
            )
        self._bind_ep_group(groups._get_expert_parallel_group(self.expert_group_name))

    def _bind_ep_group(self, ep_group: ProcessGroup) -> None:
        """All-to-all over ``ep_group`` from now on (the experts are already sized for it)."""
        size = group_size(ep_group)
        if size != self.ep_size:
            raise MoECompatError(
                f"the expert-parallel group {self.expert_group_name!r} has {size} ranks, but MoE(ep_size="
                f"{self.ep_size}) was built for {self.ep_size}"
            )
        self.ep_group = ep_group
        self.dispatcher = AllToAllTokenDispatcher(self.num_experts, ep_group)
        self.experts.first_expert_id = group_rank(ep_group) * self.num_local_experts
        self._ep_group_bound = True

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, hidden_states: Tensor, used_token: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Route ``hidden_states`` (``[..., hidden_size]``) through the experts.

        Returns ``(output, l_aux, exp_counts)`` like DeepSpeed: the output in the input's shape, the
        unscaled balance loss (a differentiable fp32 scalar: add ``coeff * l_aux`` to your loss) and
        the int64 number of routed (token, choice) assignments per expert ``[num_experts]``, before
        capacity dropping.
        """
        if used_token is not None:
            raise MoECompatError(
                "MoE.forward(used_token=...) is not supported: moe_parallel routes every token it is given; "
                "pass only the used tokens instead (e.g. hidden_states[used_token.bool()]) and scatter the "
                "output back, or use deepspeed.moe.layer.MoE"
            )
        if not self._ep_group_bound and self.ep_size > 1:
            self._create_process_groups()
        output = super().forward(hidden_states)
        l_aux = self.aux_loss
        exp_counts_E = self.last_stats.tokens_per_expert
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


def _expert_keys(module: MoE, prefix: str, j: int) -> dict[str, str]:
    """DeepSpeed keys of local expert ``j``, by the name of the grouped tensor they come from."""
    base = f"{prefix}{DS_EXPERTS_PREFIX}.{j}."
    keys = {"w1": f"{base}{module.expert_fc1_name}.weight", "w2": f"{base}{module.expert_fc2_name}.weight"}
    if module.config.expert_bias:
        keys["b1"] = f"{base}{module.expert_fc1_name}.bias"
        keys["b2"] = f"{base}{module.expert_fc2_name}.bias"
    return keys


def _state_dict_to_deepspeed_layout(
    module: MoE, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    # Per-expert keys with local ids, Linear weights as [out, in]: what DeepSpeed's engine splits
    # into one checkpoint file per global expert, and what deepspeed.moe.layer.MoE loads.
    gate_key = f"{prefix}router.weight"
    if gate_key in state_dict:
        state_dict[prefix + DS_GATE_KEY] = state_dict.pop(gate_key)
    grouped = {name: state_dict.pop(f"{prefix}experts.{name}", None) for name in ("w1", "w2", "b1", "b2")}
    for j in range(module.num_local_experts):
        for name, key in _expert_keys(module, prefix, j).items():
            value = grouped[name]
            if value is not None:
                value_j = value.detach()[j]
                state_dict[key] = value_j.t() if name in ("w1", "w2") else value_j


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
    # named_parameters() and ZeRO's consolidated checkpoints use). Incomplete DeepSpeed layouts are
    # left as they are, so strict loading reports the exact missing and unexpected keys.
    gate_key = prefix + DS_GATE_KEY
    if gate_key in state_dict:
        state_dict[f"{prefix}router.weight"] = state_dict.pop(gate_key)
    per_expert = [_expert_keys(module, prefix, j) for j in range(module.num_local_experts)]
    if not all(key in state_dict for keys in per_expert for key in keys.values()):
        return
    for name in per_expert[0]:
        slices = [state_dict.pop(keys[name]) for keys in per_expert]
        if name in ("w1", "w2"):
            slices = [s.t() for s in slices]
        state_dict[f"{prefix}experts.{name}"] = torch.stack(slices)
